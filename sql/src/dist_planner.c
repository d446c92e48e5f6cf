/*
 * dist_planner.c: which queries run on the workers, and the plan that runs them.
 *
 * A SELECT whose only relation is a distributed table (public.readings, or any table laid out like
 * it: bs_is_distributed) is split by how the
 * rows of different fragments combine:
 *   ROWS      no aggregation, DISTINCT or window: each row stands alone, fragments concatenate;
 *   BUILDING  GROUP BY / DISTINCT / PARTITION BY include building: a building lives in exactly
 *             one fragment, so every group is complete on one worker and fragments concatenate;
 *   SINGLE    anything else: runs on a worker only when pruning leaves one fragment
 *             (building = $1), otherwise PostgreSQL's own plan through postgres_fdw.
 * Every worker receives the whole query for its fragments (WHERE, GROUP BY, HAVING, DISTINCT ON,
 * ORDER BY, LIMIT count+offset); the coordinator merges sorted streams and applies OFFSET/LIMIT.
 *
 * The plan is a single custom scan carrying the original query too: at execution it falls back
 * to PostgreSQL's plan when this transaction wrote through postgres_fdw (its uncommitted rows are
 * only visible on those connections), when pushdown was turned off, or when a SINGLE query's
 * parameters select more than one fragment. Anything this planner does not recognise is planned
 * by PostgreSQL as before, so results never depend on whether the pushdown applies.
 */
#include "buildsmart.h"

#include "access/htup_details.h"
#include "access/table.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_collation.h"
#include "catalog/pg_foreign_data_wrapper.h"
#include "catalog/pg_operator.h"
#include "catalog/pg_type.h"
#include "commands/defrem.h"
#include "foreign/foreign.h"
#include "nodes/makefuncs.h"
#include "nodes/nodeFuncs.h"
#include "nodes/readfuncs.h"
#include "optimizer/clauses.h"
#include "optimizer/optimizer.h"
#include "optimizer/pathnode.h"
#include "optimizer/paths.h"
#include "optimizer/planner.h"
#include "utils/typcache.h"
#include "optimizer/restrictinfo.h"
#include "rewrite/rewriteManip.h"
#include "parser/parsetree.h"
#include "partitioning/partbounds.h"
#include "partitioning/partdesc.h"
#include "storage/lmgr.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/partcache.h"
#include "utils/rel.h"
#include "utils/ruleutils.h"
#include "utils/syscache.h"

static planner_hook_type prev_planner = NULL;
bool		bs_planning_fallback = false;

typedef struct BsFragment
{
	Oid			relid;			/* coordinator foreign table */
	char	   *qualified_name; /* the same name on the worker */
	Const	   *lower;			/* building range; NULL = unbounded */
	Const	   *upper;
	bool		time_piece;		/* part of a building split by time (a time group) */
	Const	   *ts_lower;		/* its time range; NULL = unbounded */
	Const	   *ts_upper;
} BsFragment;

static PlannedStmt *
bs_next_planner(Query *parse, const char *query_string, int cursorOptions, ParamListInfo boundParams)
{
	if (prev_planner)
		return prev_planner(parse, query_string, cursorOptions, boundParams);
	return standard_planner(parse, query_string, cursorOptions, boundParams);
}

/*
 * Is this a distributed table: partitioned by RANGE on one text column "building" under the C
 * collation, with columns meter and ts? public.readings is; so is any table the cluster lays out
 * the same way (rollups: one foreign partition per fragment). Whether its partitions really are
 * fragments (foreign tables, or time groups of them) is checked when they are loaded.
 */
bool
bs_is_distributed(Oid relid)
{
	Relation	rel;
	PartitionKey key;
	bool		ok;

	if (!OidIsValid(relid) || get_rel_relkind(relid) != RELKIND_PARTITIONED_TABLE)
		return false;
	rel = table_open(relid, NoLock);	/* the parser holds a lock */
	key = RelationGetPartitionKey(rel);
	ok = key != NULL && key->strategy == PARTITION_STRATEGY_RANGE && key->partnatts == 1 &&
		key->partattrs[0] != 0 && key->parttypid[0] == TEXTOID && key->partcollation[0] == C_COLLATION_OID;
	if (ok)
	{
		char	   *name = get_attname(relid, key->partattrs[0], false);

		ok = strcmp(name, "building") == 0 &&
			get_attnum(relid, "meter") != InvalidAttrNumber &&
			get_attnum(relid, "ts") != InvalidAttrNumber;
	}
	table_close(rel, NoLock);
	return ok;
}

#define NOT_PUSHED(why) do { *reason = (why); return NULL; } while (0)

static Const *
bs_bound_const(List *datums)
{
	PartitionRangeDatum *d = linitial_node(PartitionRangeDatum, datums);

	if (d->kind != PARTITION_RANGE_DATUM_VALUE)
		return NULL;
	return (Const *) copyObject(d->value);
}

/* The range partition bound of a partition; NULL for a default or non-range partition. */
static PartitionBoundSpec *
bs_partition_bound(Oid child)
{
	HeapTuple	tup;
	Datum		boundd;
	bool		isnull;
	PartitionBoundSpec *spec;

	tup = SearchSysCache1(RELOID, ObjectIdGetDatum(child));
	if (!HeapTupleIsValid(tup))
		elog(ERROR, "cache lookup failed for relation %u", child);
	boundd = SysCacheGetAttr(RELOID, tup, Anum_pg_class_relpartbound, &isnull);
	if (isnull)
		elog(ERROR, "partition %u has no bound", child);
	spec = castNode(PartitionBoundSpec, stringToNode(TextDatumGetCString(boundd)));
	ReleaseSysCache(tup);
	if (spec->is_default || spec->strategy != PARTITION_STRATEGY_RANGE)
		return NULL;
	return spec;
}

/* A partition that is a postgres_fdw table over the same-named worker table, as a fragment. */
static BsFragment *
bs_fragment_of(Oid child, const char **reason)
{
	ForeignTable *ft;
	ForeignServer *srv;
	ForeignDataWrapper *fdw;
	ListCell   *lc;
	char	   *schema = NULL;
	char	   *table = NULL;
	BsFragment *f;

	if (get_rel_relkind(child) != RELKIND_FOREIGN_TABLE)
		NOT_PUSHED("a partition that is not a foreign table");
	LockRelationOid(child, AccessShareLock);
	ft = GetForeignTable(child);
	srv = GetForeignServer(ft->serverid);
	fdw = GetForeignDataWrapper(srv->fdwid);
	if (strcmp(fdw->fdwname, "postgres_fdw") != 0)
		NOT_PUSHED("a partition that is not a postgres_fdw table");
	foreach(lc, ft->options)
	{
		DefElem    *d = lfirst(lc);

		if (strcmp(d->defname, "schema_name") == 0)
			schema = defGetString(d);
		else if (strcmp(d->defname, "table_name") == 0)
			table = defGetString(d);
	}
	if (schema == NULL || table == NULL ||
		strcmp(schema, get_namespace_name(get_rel_namespace(child))) != 0 ||
		strcmp(table, get_rel_name(child)) != 0)
		NOT_PUSHED("a fragment whose worker table has another name");
	f = palloc0(sizeof(BsFragment));
	f->relid = child;
	f->qualified_name = quote_qualified_identifier(schema, table);
	return f;
}

/*
 * The fragments of the distributed table with their building ranges, and, for a building split
 * by time (a partition that is itself partitioned by ts: a time group), each time piece with its
 * time range. NULL when the layout is not one this planner handles.
 */
static List *
bs_load_fragments(Oid dist, const char **reason)
{
	Relation	rel = table_open(dist, NoLock);	/* locked by the parser */
	PartitionDesc pd = RelationGetPartitionDesc(rel, true);
	List	   *out = NIL;
	int			i;

	for (i = 0; i < pd->nparts; i++)
	{
		Oid			child = pd->oids[i];
		PartitionBoundSpec *spec = bs_partition_bound(child);
		Const	   *lower,
				   *upper;

		if (spec == NULL)
		{
			table_close(rel, NoLock);
			NOT_PUSHED("a default or non-range partition");
		}
		lower = bs_bound_const(spec->lowerdatums);
		upper = bs_bound_const(spec->upperdatums);
		if (get_rel_relkind(child) == RELKIND_PARTITIONED_TABLE)
		{
			Relation	group = table_open(child, AccessShareLock);
			PartitionDesc gd = RelationGetPartitionDesc(group, true);
			int			j;

			for (j = 0; j < gd->nparts; j++)
			{
				PartitionBoundSpec *ts = bs_partition_bound(gd->oids[j]);
				BsFragment *f = ts ? bs_fragment_of(gd->oids[j], reason) : NULL;

				if (f == NULL)
				{
					table_close(group, AccessShareLock);
					table_close(rel, NoLock);
					if (ts == NULL)
						*reason = "a default partition in a time group";
					return NULL;
				}
				f->lower = lower;
				f->upper = upper;
				f->time_piece = true;
				f->ts_lower = bs_bound_const(ts->lowerdatums);
				f->ts_upper = bs_bound_const(ts->upperdatums);
				out = lappend(out, f);
			}
			table_close(group, AccessShareLock);
		}
		else
		{
			BsFragment *f = bs_fragment_of(child, reason);

			if (f == NULL)
			{
				table_close(rel, NoLock);
				return NULL;
			}
			f->lower = lower;
			f->upper = upper;
			out = lappend(out, f);
		}
	}
	table_close(rel, NoLock);
	if (out == NIL)
		NOT_PUSHED("no fragments");
	return out;
}

/* text comparison in C collation (byte order), as the building range partitions use */
static int
bs_cmp_c(Datum a, Datum b)
{
	return DatumGetInt32(DirectFunctionCall2Coll(bttextcmp, C_COLLATION_OID, a, b));
}

static bool
bs_fragment_holds(BsFragment *f, Datum building)
{
	if (f->lower != NULL && bs_cmp_c(building, f->lower->constvalue) < 0)
		return false;
	if (f->upper != NULL && bs_cmp_c(building, f->upper->constvalue) >= 0)
		return false;
	return true;
}

/* Can a time piece [ts_lower, ts_upper) hold a row with ts <op> v? (Whole fragments always can.) */
bool
bs_time_may_hold(Const *lo, Const *hi, int kind, TimestampTz v)
{
	bool		lo_ok = lo == NULL || lo->constisnull;
	bool		hi_ok = hi == NULL || hi->constisnull;
	TimestampTz l = lo_ok ? 0 : DatumGetTimestampTz(lo->constvalue);
	TimestampTz h = hi_ok ? 0 : DatumGetTimestampTz(hi->constvalue);

	switch (kind)
	{
		case BS_PRUNE_TS_LT:
			return lo_ok || l < v;
		case BS_PRUNE_TS_LE:
			return lo_ok || l <= v;
		case BS_PRUNE_TS_EQ:
			return (lo_ok || l <= v) && (hi_ok || v < h);
		case BS_PRUNE_TS_GE:
		case BS_PRUNE_TS_GT:
			return hi_ok || h > v;
		default:
			return true;
	}
}

static Oid	bs_pruning_dist = InvalidOid;	/* the distributed table, for its ts column */

static Node *
bs_strip(Node *n)
{
	while (n && IsA(n, RelabelType))
		n = (Node *) ((RelabelType *) n)->arg;
	return n;
}

/* Follow a Var of the RTE_GROUP entry to the grouping expression it stands for. */
static Node *
bs_ungroup(Query *q, Index group_rti, Node *n)
{
	n = bs_strip(n);
	if (group_rti > 0 && n && IsA(n, Var) && ((Var *) n)->varno == (int) group_rti &&
		((Var *) n)->varlevelsup == 0)
	{
		RangeTblEntry *g = rt_fetch(group_rti, q->rtable);

		n = bs_strip(list_nth(g->groupexprs, ((Var *) n)->varattno - 1));
	}
	return n;
}

static bool
bs_is_column(Query *q, Index dist_rti, Index group_rti, Node *n, AttrNumber attno)
{
	n = bs_ungroup(q, group_rti, n);
	return n && IsA(n, Var) && ((Var *) n)->varno == (int) dist_rti &&
		((Var *) n)->varlevelsup == 0 && ((Var *) n)->varattno == attno;
}

/* Does a list of SortGroupClauses include the building column? */
static bool
bs_clauses_include(Query *q, Index dist_rti, Index group_rti, List *clauses, AttrNumber attno)
{
	ListCell   *lc;

	foreach(lc, clauses)
	{
		SortGroupClause *sgc = lfirst(lc);
		TargetEntry *tle = get_sortgroupclause_tle(sgc, q->targetList);

		if (bs_is_column(q, dist_rti, group_rti, (Node *) tle->expr, attno))
			return true;
	}
	return false;
}

/*
 * Conjuncts of WHERE that pin the building: building = value, building = ANY(array). The value
 * must not depend on the row; constants prune now, parameters when the plan runs.
 */
/* ts <op> value, with the value free of columns: a pruning kind for time pieces, or 0 */
static int
bs_time_comparison(Node *c, Index dist_rti, AttrNumber a_ts, Node **value)
{
	OpExpr	   *op = (OpExpr *) c;
	Node	   *l,
			   *r;
	char	   *name;
	bool		commuted;

	if (a_ts == InvalidAttrNumber || !IsA(c, OpExpr) || list_length(op->args) != 2)
		return 0;
	l = bs_strip(linitial(op->args));
	r = bs_strip(lsecond(op->args));
	if (IsA(l, Var) && ((Var *) l)->varno == (int) dist_rti && ((Var *) l)->varattno == a_ts)
		commuted = false;
	else if (IsA(r, Var) && ((Var *) r)->varno == (int) dist_rti && ((Var *) r)->varattno == a_ts)
		commuted = true;
	else
		return 0;
	*value = commuted ? l : r;
	if (exprType(*value) != TIMESTAMPTZOID || exprType(commuted ? r : l) != TIMESTAMPTZOID ||
		contain_vars_of_level(*value, 0) || contain_volatile_functions(*value) || contain_subplans(*value) ||
		contain_agg_clause(*value))
		return 0;
	name = get_opname(op->opno);
	if (name == NULL)
		return 0;
	if (strcmp(name, "=") == 0)
		return BS_PRUNE_TS_EQ;
	if (strcmp(name, "<") == 0)
		return commuted ? BS_PRUNE_TS_GT : BS_PRUNE_TS_LT;
	if (strcmp(name, "<=") == 0)
		return commuted ? BS_PRUNE_TS_GE : BS_PRUNE_TS_LE;
	if (strcmp(name, ">") == 0)
		return commuted ? BS_PRUNE_TS_LT : BS_PRUNE_TS_GT;
	if (strcmp(name, ">=") == 0)
		return commuted ? BS_PRUNE_TS_LE : BS_PRUNE_TS_GE;
	return 0;
}

/* Can the building range [lo, hi) hold a building <op> v (C order)? NULL bounds are open. */
bool
bs_range_may_hold(Const *lo, Const *hi, int kind, Datum v)
{
	bool		lo_open = lo == NULL || lo->constisnull;
	bool		hi_open = hi == NULL || hi->constisnull;

	switch (kind)
	{
		case BS_PRUNE_B_LT:
			return lo_open || bs_cmp_c(lo->constvalue, v) < 0;
		case BS_PRUNE_B_LE:
			return lo_open || bs_cmp_c(lo->constvalue, v) <= 0;
		case BS_PRUNE_B_GE:
		case BS_PRUNE_B_GT:
			return hi_open || bs_cmp_c(hi->constvalue, v) > 0;
		default:
			return true;
	}
}

/* building <op> value with text's btree operators under the C collation: a range kind, or 0 */
static int
bs_building_range(Node *c, Index dist_rti, AttrNumber attno, Node **value)
{
	OpExpr	   *op = (OpExpr *) c;
	Node	   *l,
			   *r;
	bool		commuted;
	int			k;

	if (!IsA(c, OpExpr) || list_length(op->args) != 2 || op->inputcollid != C_COLLATION_OID)
		return 0;
	l = bs_strip(linitial(op->args));
	r = bs_strip(lsecond(op->args));
	if (IsA(l, Var) && ((Var *) l)->varno == (int) dist_rti && ((Var *) l)->varattno == attno &&
		((Var *) l)->varlevelsup == 0)
		commuted = false;
	else if (IsA(r, Var) && ((Var *) r)->varno == (int) dist_rti && ((Var *) r)->varattno == attno &&
			 ((Var *) r)->varlevelsup == 0)
		commuted = true;
	else
		return 0;
	*value = commuted ? l : r;
	if (exprType(*value) != TEXTOID || contain_vars_of_level(*value, 0) || contain_volatile_functions(*value) ||
		contain_subplans(*value) || contain_agg_clause(*value))
		return 0;
	switch (op->opno)
	{
		case TextLessOperator:	/* text < text */
			k = BS_PRUNE_B_LT;
			break;
		case 665:				/* text <= text */
			k = BS_PRUNE_B_LE;
			break;
		case 666:				/* text > text */
			k = BS_PRUNE_B_GT;
			break;
		case TextGreaterEqualOperator:	/* text >= text */
			k = BS_PRUNE_B_GE;
			break;
		default:
			return 0;
	}
	if (commuted)				/* v < building is building > v */
		k = k == BS_PRUNE_B_LT ? BS_PRUNE_B_GT : k == BS_PRUNE_B_LE ? BS_PRUNE_B_GE :
			k == BS_PRUNE_B_GT ? BS_PRUNE_B_LT : BS_PRUNE_B_LE;
	return k;
}

static void
bs_find_pruning(Node *quals, Index dist_rti, AttrNumber attno, List **exprs, List **kinds)
{
	List	   *conj = make_ands_implicit((Expr *) quals);
	ListCell   *lc;
	AttrNumber	a_ts = OidIsValid(bs_pruning_dist) ? get_attnum(bs_pruning_dist, "ts") : InvalidAttrNumber;

	foreach(lc, conj)
	{
		Node	   *c = lfirst(lc);
		Node	   *tsval = NULL;
		int			tskind = bs_time_comparison(c, dist_rti, a_ts, &tsval);

		Node	   *bval = NULL;
		int			bkind;

		if (tskind != 0)
		{
			*exprs = lappend(*exprs, copyObject(tsval));
			*kinds = lappend_int(*kinds, tskind);
			continue;
		}
		bkind = bs_building_range(c, dist_rti, attno, &bval);
		if (bkind != 0)
		{
			*exprs = lappend(*exprs, copyObject(bval));
			*kinds = lappend_int(*kinds, bkind);
			continue;
		}

		if (IsA(c, OpExpr) && list_length(((OpExpr *) c)->args) == 2 &&
			((OpExpr *) c)->opno == TextEqualOperator)
		{
			OpExpr	   *op = (OpExpr *) c;
			Node	   *l = bs_strip(linitial(op->args));
			Node	   *r = bs_strip(lsecond(op->args));
			Node	   *val = NULL;

			if (IsA(l, Var) && ((Var *) l)->varno == (int) dist_rti && ((Var *) l)->varattno == attno)
				val = r;
			else if (IsA(r, Var) && ((Var *) r)->varno == (int) dist_rti && ((Var *) r)->varattno == attno)
				val = l;
			if (val && !contain_vars_of_level(val, 0) && !contain_volatile_functions(val) &&
				!contain_subplans(val) && !contain_agg_clause(val))
			{
				*exprs = lappend(*exprs, copyObject(val));
				*kinds = lappend_int(*kinds, BS_PRUNE_EQ);
			}
		}
		else if (IsA(c, ScalarArrayOpExpr) && ((ScalarArrayOpExpr *) c)->useOr &&
				 ((ScalarArrayOpExpr *) c)->opno == TextEqualOperator)
		{
			ScalarArrayOpExpr *op = (ScalarArrayOpExpr *) c;
			Node	   *l = bs_strip(linitial(op->args));
			Node	   *r = lsecond(op->args);

			if (IsA(l, Var) && ((Var *) l)->varno == (int) dist_rti && ((Var *) l)->varattno == attno &&
				!contain_vars_of_level(r, 0) && !contain_volatile_functions(r) && !contain_subplans(r))
			{
				*exprs = lappend(*exprs, copyObject(r));
				*kinds = lappend_int(*kinds, BS_PRUNE_ANY);
			}
		}
	}
}

/* The value of a parameter known at planning time (a custom plan), as a constant. */
static Const *
bs_bound_param(Node *e, ParamListInfo bound)
{
	Param	   *p = (Param *) e;
	ParamExternData *prm;
	ParamExternData prmdata;

	if (!IsA(e, Param) || p->paramkind != PARAM_EXTERN || bound == NULL ||
		p->paramid <= 0 || p->paramid > bound->numParams)
		return NULL;
	prm = bound->paramFetch ? bound->paramFetch(bound, p->paramid, false, &prmdata)
		: &bound->params[p->paramid - 1];
	if (prm == NULL || !OidIsValid(prm->ptype) || prm->ptype != p->paramtype ||
		!(prm->pflags & PARAM_FLAG_CONST))
		return NULL;
	return makeConst(p->paramtype, p->paramtypmod, p->paramcollid, get_typlen(p->paramtype),
					 prm->value, prm->isnull, get_typbyval(p->paramtype));
}

/*
 * Static pruning: which fragments can hold rows when the pruning values are constants (or
 * parameters whose values this custom plan is made for).
 */
static List *
bs_prune_static(List *fragments, List *exprs, List *kinds, ParamListInfo bound)
{
	ListCell   *le,
			   *lk;
	List	   *keep = fragments;

	forboth(le, exprs, lk, kinds)
	{
		Node	   *e = lfirst(le);
		List	   *next = NIL;
		ListCell   *lf;
		Const	   *bp = bs_bound_param(e, bound);

		if (bp != NULL)
			e = (Node *) bp;
		else if (!IsA(e, Const))
			e = eval_const_expressions(NULL, e);	/* IN ('a', 'b') is still an ArrayExpr here */
		if (!IsA(e, Const))
			continue;
		foreach(lf, keep)
		{
			BsFragment *f = lfirst(lf);
			Const	   *c = (Const *) e;
			bool		hit = false;

			if (c->constisnull)
				hit = false;
			else if (BS_PRUNE_IS_TS(lfirst_int(lk)))
				hit = !f->time_piece ||
					bs_time_may_hold(f->ts_lower, f->ts_upper, lfirst_int(lk), DatumGetTimestampTz(c->constvalue));
			else if (BS_PRUNE_IS_RANGE(lfirst_int(lk)))
				hit = bs_range_may_hold(f->lower, f->upper, lfirst_int(lk), c->constvalue);
			else if (lfirst_int(lk) == BS_PRUNE_EQ)
				hit = bs_fragment_holds(f, c->constvalue);
			else
			{
				ArrayType  *arr = DatumGetArrayTypeP(c->constvalue);
				Datum	   *elems;
				bool	   *nulls;
				int			n,
							i;

				deconstruct_array_builtin(arr, TEXTOID, &elems, &nulls, &n);
				for (i = 0; i < n && !hit; i++)
					hit = !nulls[i] && bs_fragment_holds(f, elems[i]);
			}
			if (hit)
				next = lappend(next, f);
		}
		keep = next;
	}
	return keep;
}

static Oid
bs_attcollation(Oid relid, AttrNumber attno)
{
	Oid			typid,
				collid;
	int32		typmod;

	get_atttypetypmodcoll(relid, attno, &typid, &typmod, &collid);
	return collid;
}

typedef struct BsSkipScan
{
	bool		applies;
	bool		ts_desc;
} BsSkipScan;

/*
 * DISTINCT ON (building, meter) ... ORDER BY building, meter, ts [DESC]: the latest (or first)
 * reading of every meter.
 */
static BsSkipScan
bs_skip_scan_shape(Query *q, Index dist_rti, AttrNumber a_building, AttrNumber a_meter, AttrNumber a_ts)
{
	BsSkipScan	r = {false, false};
	SortGroupClause *s1,
			   *s2,
			   *s3;
	TargetEntry *t1,
			   *t2,
			   *t3;
	bool		reverse;
	Oid			opfamily,
				opcintype;
	CompareType strategy;

	if (!bs_enable_skip_scan || !q->hasDistinctOn || list_length(q->distinctClause) != 2 ||
		list_length(q->sortClause) != 3 || q->hasAggs || q->groupClause || q->havingQual ||
		q->hasWindowFuncs || q->hasTargetSRFs || list_length(q->rtable) != 1)
		return r;
	s1 = linitial(q->sortClause);
	s2 = lsecond(q->sortClause);
	s3 = lthird(q->sortClause);
	t1 = get_sortgroupclause_tle(s1, q->targetList);
	t2 = get_sortgroupclause_tle(s2, q->targetList);
	t3 = get_sortgroupclause_tle(s3, q->targetList);
	if (!bs_is_column(q, dist_rti, 0, (Node *) t1->expr, a_building) ||
		!bs_is_column(q, dist_rti, 0, (Node *) t2->expr, a_meter) ||
		!bs_is_column(q, dist_rti, 0, (Node *) t3->expr, a_ts))
		return r;
	if (!bs_clauses_include(q, dist_rti, 0, q->distinctClause, a_building) ||
		!bs_clauses_include(q, dist_rti, 0, q->distinctClause, a_meter))
		return r;
	/* building and meter ascending in their own collation, as the primary key index */
	if (!get_ordering_op_properties(s1->sortop, &opfamily, &opcintype, &strategy) || strategy != COMPARE_LT)
		return r;
	if (!get_ordering_op_properties(s2->sortop, &opfamily, &opcintype, &strategy) || strategy != COMPARE_LT)
		return r;
	if (exprCollation((Node *) t1->expr) != C_COLLATION_OID ||
		exprCollation((Node *) t2->expr) != bs_attcollation(rt_fetch(dist_rti, q->rtable)->relid, a_meter))
		return r;
	if (!get_ordering_op_properties(s3->sortop, &opfamily, &opcintype, &strategy))
		return r;
	reverse = (strategy == COMPARE_GT);
	r.applies = true;
	r.ts_desc = reverse;
	return r;
}

/*
 * Rows of one building in ts order with a LIMIT (the latest n readings of a building, ORDER BY
 * ts DESC, meter LIMIT n): each meter's newest rows by the primary key read backwards, then the
 * query's own ORDER BY and LIMIT (bs_deparse_latest_n). Not for one meter (meter = ...): the
 * worker reads that from the primary key as it is, without walking the meters. Every sort key must use its type's default
 * ordering so that the worker can sort by position.
 */
/* Does a top-level condition fix this text column to one value (column = expression without columns)? */
static bool
bs_fixed_by_quals(Node *quals, Index dist_rti, AttrNumber attno)
{
	ListCell   *lc;

	foreach(lc, make_ands_implicit((Expr *) quals))
	{
		OpExpr	   *op = lfirst(lc);
		Node	   *l,
				   *r;

		if (!IsA(op, OpExpr) || op->opno != TextEqualOperator || list_length(op->args) != 2)
			continue;
		l = bs_strip(linitial(op->args));
		r = bs_strip(lsecond(op->args));
		if (IsA(r, Var) && !IsA(l, Var))
		{
			Node	   *t = l;

			l = r;
			r = t;
		}
		if (IsA(l, Var) && ((Var *) l)->varno == (int) dist_rti && ((Var *) l)->varattno == attno &&
			((Var *) l)->varlevelsup == 0 && !contain_vars_of_level(r, 0) && !contain_volatile_functions(r))
			return true;
	}
	return false;
}

static BsSkipScan
bs_latest_n_shape(Query *q, BsShape shape, Index dist_rti, AttrNumber a_ts, List *prune_kinds, bool direct,
				  bool limited)
{
	BsSkipScan	r = {false, false};
	SortGroupClause *s1;
	TargetEntry *t1;
	ListCell   *lc;

	if (!bs_enable_skip_scan || !direct || !limited || shape != BS_SHAPE_ROWS || q->hasTargetSRFs ||
		q->distinctClause != NIL || q->sortClause == NIL || list_length(q->rtable) != 1 ||
		!list_member_int(prune_kinds, BS_PRUNE_EQ))
		return r;
	/* one meter: its primary key read backwards already gives the rows in ts order */
	if (bs_fixed_by_quals(q->jointree->quals, dist_rti, get_attnum(rt_fetch(dist_rti, q->rtable)->relid, "meter")))
		return r;
	s1 = linitial(q->sortClause);
	t1 = get_sortgroupclause_tle(s1, q->targetList);
	if (!bs_is_column(q, dist_rti, 0, (Node *) t1->expr, a_ts))
		return r;
	foreach(lc, q->sortClause)
	{
		SortGroupClause *sgc = lfirst(lc);
		TargetEntry *tle = get_sortgroupclause_tle(sgc, q->targetList);
		TypeCacheEntry *tc = lookup_type_cache(exprType((Node *) tle->expr), TYPECACHE_LT_OPR | TYPECACHE_GT_OPR);

		if (!OidIsValid(sgc->sortop) || (sgc->sortop != tc->lt_opr && sgc->sortop != tc->gt_opr))
			return r;
	}
	r.applies = true;
	r.ts_desc = (s1->sortop == lookup_type_cache(exprType((Node *) t1->expr), TYPECACHE_GT_OPR)->gt_opr);
	return r;
}

/*
 * The output expressions as EXPLAIN shows them: Vars of the RTE_GROUP entry become the
 * expressions they stand for, and window functions plain calls (their window is on the worker).
 * Never evaluated on the coordinator.
 */
static Node *
bs_flatten_group_mutator(Node *node, Query *q)
{
	if (node == NULL)
		return NULL;
	if (IsA(node, WindowFunc))
	{
		WindowFunc *w = (WindowFunc *) node;

		return (Node *) makeFuncExpr(w->winfnoid, w->wintype,
									 (List *) bs_flatten_group_mutator((Node *) w->args, q),
									 w->wincollid, w->inputcollid, COERCE_EXPLICIT_CALL);
	}
	if (IsA(node, Var) && q->hasGroupRTE)
	{
		Var		   *v = (Var *) node;
		RangeTblEntry *rte;

		if (v->varlevelsup == 0 && v->varno > 0 && v->varno <= list_length(q->rtable))
		{
			rte = rt_fetch(v->varno, q->rtable);
			if (rte->rtekind == RTE_GROUP)
				return copyObject(list_nth(rte->groupexprs, v->varattno - 1));
		}
	}
	return expression_tree_mutator(node, bs_flatten_group_mutator, q);
}

/* What the executor learns about the fragments a plan may read (custom_private lists). */
typedef struct BsFragLists
{
	List	   *oids;
	List	   *sql;
	List	   *lower;
	List	   *upper;
	List	   *ts_lower;
	List	   *ts_upper;
} BsFragLists;

static Node *
bs_or_null(Const *c, Oid type, Oid collation)
{
	return c ? (Node *) c : (Node *) makeNullConst(type, -1, collation);
}

static void
bs_add_fragment(BsFragLists *fl, BsFragment *f, char *sql)
{
	fl->oids = lappend_oid(fl->oids, f->relid);
	fl->sql = lappend(fl->sql, makeString(sql));
	fl->lower = lappend(fl->lower, bs_or_null(f->lower, TEXTOID, C_COLLATION_OID));
	fl->upper = lappend(fl->upper, bs_or_null(f->upper, TEXTOID, C_COLLATION_OID));
	fl->ts_lower = lappend(fl->ts_lower, bs_or_null(f->ts_lower, TIMESTAMPTZOID, InvalidOid));
	fl->ts_upper = lappend(fl->ts_upper, bs_or_null(f->ts_upper, TIMESTAMPTZOID, InvalidOid));
}

/* custom_private in the order of BS_PRIV_* */
static List *
bs_private(Query *q, BsFragLists *fl, List *ints, List *sort_attno, List *sort_op, List *sort_coll,
		   List *sort_nf, List *prune_kinds, const char *note)
{
	List	   *priv = NIL;

	priv = lappend(priv, copyObject(q));
	priv = lappend(priv, fl->oids);
	priv = lappend(priv, fl->sql);
	priv = lappend(priv, fl->lower);
	priv = lappend(priv, fl->upper);
	priv = lappend(priv, ints);
	priv = lappend(priv, sort_attno);
	priv = lappend(priv, sort_op);
	priv = lappend(priv, sort_coll);
	priv = lappend(priv, sort_nf);
	priv = lappend(priv, prune_kinds);
	priv = lappend(priv, makeString(pstrdup(note)));
	priv = lappend(priv, fl->ts_lower);
	priv = lappend(priv, fl->ts_upper);
	Assert(list_length(priv) == BS_PRIV_COUNT);
	return priv;
}

/* What a query over the distributed table is, when this planner can run it. */
typedef struct BsAnalysis
{
	Oid			dist;
	Index		dist_rti;
	Index		group_rti;
	AttrNumber	a_building;
	AttrNumber	a_meter;
	AttrNumber	a_ts;
	BsShape		shape;
	List	   *fragments;		/* after static pruning */
	List	   *prune_exprs;
	List	   *prune_kinds;
} BsAnalysis;

/*
 * Can this query (or the partial query of a two-phase aggregate) run on the workers at all?
 * Fills the analysis; NULL reason when it can.
 */
static bool
bs_analyze(Query *q, Oid dist, ParamListInfo bound, BsAnalysis *a, const char **reason)
{
	Index		rti = 0;
	ListCell   *lc;
	BsShipContext ship;

	memset(a, 0, sizeof(*a));
	a->dist = dist;
	if (q->cteList || q->setOperations || q->rowMarks || q->hasSubLinks || q->hasModifyingCTE ||
		q->hasForUpdate || q->hasRecursive || q->groupingSets || q->hasRowSecurity || q->utilityStmt)
	{
		*reason = "sub-selects, CTEs, set operations, locking clauses or grouping sets";
		return false;
	}
	if (q->limitOption == LIMIT_OPTION_WITH_TIES)
	{
		*reason = "FETCH ... WITH TIES";
		return false;
	}
	foreach(lc, q->rtable)
	{
		RangeTblEntry *rte = lfirst(lc);

		rti++;
		if (rte->rtekind == RTE_RELATION && rte->relid == dist && rte->inh && rte->tablesample == NULL &&
			a->dist_rti == 0)
			a->dist_rti = rti;
		else if (rte->rtekind == RTE_GROUP && a->group_rti == 0)
			a->group_rti = rti;
		else
		{
			*reason = "another relation besides the distributed table";
			return false;
		}
	}
	if (a->dist_rti == 0 || list_length(q->jointree->fromlist) != 1 ||
		!IsA(linitial(q->jointree->fromlist), RangeTblRef))
	{
		*reason = "not a plain scan of the distributed table";
		return false;
	}
	{
		Relation	rel = table_open(dist, NoLock);
		bool		rls = rel->rd_rel->relrowsecurity;

		table_close(rel, NoLock);
		if (rls)
		{
			*reason = "row level security on the distributed table";
			return false;
		}
	}
	memset(&ship, 0, sizeof(ship));
	ship.dist_rti = a->dist_rti;
	ship.group_rti = a->group_rti;
	if (!bs_expr_shippable((Node *) q->targetList, &ship) ||
		!bs_expr_shippable(q->jointree->quals, &ship) ||
		!bs_expr_shippable(q->havingQual, &ship) ||
		(a->group_rti > 0 && !bs_expr_shippable((Node *) rt_fetch(a->group_rti, q->rtable)->groupexprs, &ship)))
	{
		*reason = ship.reason;
		return false;
	}
	foreach(lc, q->windowClause)
	{
		WindowClause *wc = lfirst(lc);

		if (!bs_expr_shippable(wc->startOffset, &ship) || !bs_expr_shippable(wc->endOffset, &ship))
		{
			*reason = ship.reason;
			return false;
		}
	}
	if (contain_volatile_functions(q->limitCount) || contain_volatile_functions(q->limitOffset))
	{
		*reason = "a volatile LIMIT";
		return false;
	}
	foreach(lc, q->targetList)
	{
		Oid			t = exprType((Node *) ((TargetEntry *) lfirst(lc))->expr);

		/* results cross the wire: an anonymous record cannot be read back */
		if (t == RECORDOID || t == RECORDARRAYOID || get_typtype(t) == TYPTYPE_PSEUDO)
		{
			*reason = "a result column of an anonymous record or pseudo type";
			return false;
		}
	}
	a->a_building = get_attnum(dist, "building");
	a->a_meter = get_attnum(dist, "meter");
	a->a_ts = get_attnum(dist, "ts");
	if (a->a_building == InvalidAttrNumber || a->a_meter == InvalidAttrNumber || a->a_ts == InvalidAttrNumber)
	{
		*reason = "readings without building, meter and ts";
		return false;
	}

	/* how fragments combine */
	if (!q->hasAggs && q->groupClause == NIL && q->havingQual == NULL && !q->hasWindowFuncs &&
		q->distinctClause == NIL)
		a->shape = BS_SHAPE_ROWS;
	else
	{
		bool		ok = true;

		if (q->hasAggs || q->groupClause || q->havingQual)
			ok = ok && bs_clauses_include(q, a->dist_rti, a->group_rti, q->groupClause, a->a_building);
		if (q->hasWindowFuncs)
			foreach(lc, q->windowClause)
				ok = ok && bs_clauses_include(q, a->dist_rti, a->group_rti,
											  ((WindowClause *) lfirst(lc))->partitionClause, a->a_building);
		if (q->distinctClause)
		{
			ok = ok && bs_clauses_include(q, a->dist_rti, a->group_rti, q->distinctClause, a->a_building);
			if (!q->hasDistinctOn)
				foreach(lc, q->targetList)
					ok = ok && !((TargetEntry *) lfirst(lc))->resjunk;	/* junk would change DISTINCT */
		}
		a->shape = ok ? BS_SHAPE_BUILDING : BS_SHAPE_SINGLE;
	}
	a->fragments = bs_load_fragments(dist, reason);
	if (a->fragments == NIL)
		return false;
	bs_pruning_dist = dist;
	bs_find_pruning(q->jointree->quals, a->dist_rti, a->a_building, &a->prune_exprs, &a->prune_kinds);
	a->fragments = bs_prune_static(a->fragments, a->prune_exprs, a->prune_kinds, bound);
	return true;
}

/*
 * The custom scan that sends q to the fragments. Direct mode (the whole query): worker LIMIT is
 * count+offset, the coordinator merges sorted streams and applies OFFSET/LIMIT, the latest-per-
 * meter shape becomes a skip scan. Leaf mode (the partial query under a two-phase aggregate):
 * rows are only concatenated; the plan above does the rest.
 */
static CustomScan *
bs_build_scan(Query *q, BsAnalysis *a, bool direct, int cursorOptions, const char *extra_note, int redistinct)
{
	BsShipContext ship;
	Query	   *wq;
	ListCell   *lc;
	bool		has_limit = direct && (q->limitCount != NULL || q->limitOffset != NULL);
	int			limit_param = 0;
	BsSkipScan	skip = {false, false};
	BsSkipScan	latest = {false, false};
	char	   *limit_text = NULL;
	BsFragLists fl = {0};
	List	   *sort_attno = NIL,
			   *sort_op = NIL,
			   *sort_coll = NIL,
			   *sort_nf = NIL;
	bool		binary = true;
	List	   *custom_exprs;
	List	   *priv = NIL;
	List	   *ints = NIL;
	List	   *tlist = NIL;
	List	   *scan_tlist = NIL;
	StringInfoData note;
	int			i;

	memset(&ship, 0, sizeof(ship));
	ship.dist_rti = a->dist_rti;
	ship.group_rti = a->group_rti;

	/* the worker query: all target columns (sort keys too), LIMIT count+offset as a parameter */
	wq = copyObject(q);
	foreach(lc, wq->targetList)
		((TargetEntry *) lfirst(lc))->resjunk = false;
	if (direct)
	{
		wq->limitCount = NULL;
		wq->limitOffset = NULL;
		wq->limitOption = LIMIT_OPTION_COUNT;
	}
	wq->targetList = (List *) bs_extract_params((Node *) wq->targetList, &ship);
	wq->jointree->quals = bs_extract_params(wq->jointree->quals, &ship);
	wq->havingQual = bs_extract_params(wq->havingQual, &ship);
	wq->limitCount = bs_extract_params(wq->limitCount, &ship);
	wq->limitOffset = bs_extract_params(wq->limitOffset, &ship);
	if (a->group_rti > 0)
	{
		RangeTblEntry *g = rt_fetch(a->group_rti, wq->rtable);

		g->groupexprs = (List *) bs_extract_params((Node *) g->groupexprs, &ship);
	}
	foreach(lc, wq->windowClause)
	{
		WindowClause *wc = lfirst(lc);

		wc->startOffset = bs_extract_params(wc->startOffset, &ship);
		wc->endOffset = bs_extract_params(wc->endOffset, &ship);
	}
	if (has_limit)
	{
		/* LIMIT 1 arrives as int8(1): fold it so the constant case is seen */
		q = copyObject(q);
		q->limitCount = eval_const_expressions(NULL, q->limitCount);
		q->limitOffset = eval_const_expressions(NULL, q->limitOffset);
	}
	if (has_limit && q->limitCount != NULL && IsA(q->limitCount, Const) &&
		(q->limitOffset == NULL || IsA(q->limitOffset, Const)))
	{
		/*
		 * A constant LIMIT goes to the worker as a constant: with a parameter instead, the
		 * worker's planner cannot cost a generic plan for LIMIT 1 and re-plans every execution.
		 */
		Const	   *cnt = (Const *) q->limitCount;
		Const	   *off = (Const *) q->limitOffset;

		if (!cnt->constisnull)
		{
			int64		n = DatumGetInt64(cnt->constvalue);

			if (off != NULL && !off->constisnull && DatumGetInt64(off->constvalue) > 0)
				n += DatumGetInt64(off->constvalue);
			wq->limitCount = (Node *) makeConst(INT8OID, -1, InvalidOid, sizeof(int64), Int64GetDatum(n),
												false, FLOAT8PASSBYVAL);
		}
	}
	else if (has_limit && q->limitCount != NULL)
	{
		Param	   *p = makeNode(Param);

		limit_param = list_length(ship.param_exprs) + 1;
		p->paramkind = PARAM_EXTERN;
		p->paramid = limit_param;
		p->paramtype = INT8OID;
		p->paramtypmod = -1;
		p->paramcollid = InvalidOid;
		p->location = -1;
		wq->limitCount = (Node *) p;
	}

	if (direct)
		skip = bs_skip_scan_shape(q, a->dist_rti, a->a_building, a->a_meter, a->a_ts);
	if (!skip.applies)
	{
		if (wq->limitCount != NULL && IsA(wq->limitCount, Const) && !((Const *) wq->limitCount)->constisnull)
			limit_text = psprintf(INT64_FORMAT, DatumGetInt64(((Const *) wq->limitCount)->constvalue));
		else if (limit_param > 0)
			limit_text = psprintf("$%d", limit_param);
		latest = bs_latest_n_shape(q, a->shape, a->dist_rti, a->a_ts, a->prune_kinds, direct, limit_text != NULL);
	}
	foreach(lc, a->fragments)
	{
		BsFragment *f = lfirst(lc);
		RangeTblEntry *r = rt_fetch(a->dist_rti, wq->rtable);
		char	   *sql;

		r->relid = f->relid;
		r->relkind = RELKIND_FOREIGN_TABLE;
		r->inh = true;			/* no ONLY: the worker table is partitioned by time */
		if (skip.applies)
			sql = bs_deparse_skip_scan(wq, f->relid, f->qualified_name, skip.ts_desc, limit_param);
		else if (latest.applies)
			sql = bs_deparse_latest_n(wq, f->relid, f->qualified_name, limit_text);
		else
			sql = bs_deparse_query(wq);
		bs_add_fragment(&fl, f, sql);
	}

	/* coordinator merge keys */
	if (direct)
	{
		foreach(lc, q->sortClause)
		{
			SortGroupClause *sgc = lfirst(lc);
			TargetEntry *tle = get_sortgroupclause_tle(sgc, q->targetList);

			sort_attno = lappend_int(sort_attno, tle->resno);
			sort_op = lappend_oid(sort_op, sgc->sortop);
			sort_coll = lappend_oid(sort_coll, exprCollation((Node *) tle->expr));
			sort_nf = lappend_int(sort_nf, sgc->nulls_first);
		}
	}

	/* output: the query's target list; binary transfer when every column is a built-in type */
	i = 0;
	foreach(lc, q->targetList)
	{
		TargetEntry *tle = lfirst(lc);
		Node	   *expr = bs_flatten_group_mutator((Node *) tle->expr, q);
		Var		   *v;

		i++;
		if (!bs_type_is_builtin(exprType(expr)))
			binary = false;
		if (a->dist_rti != 1)
			ChangeVarNodes(expr, a->dist_rti, 1, 0);
		scan_tlist = lappend(scan_tlist, makeTargetEntry((Expr *) expr, i, tle->resname, false));
		v = makeVar(INDEX_VAR, i, exprType(expr), exprTypmod(expr), exprCollation(expr), 0);
		tlist = lappend(tlist, makeTargetEntry((Expr *) v, i, tle->resname, tle->resjunk));
	}

	custom_exprs = list_concat(list_copy(ship.param_exprs), a->prune_exprs);
	if (has_limit)
	{
		custom_exprs = lappend(custom_exprs, copyObject(q->limitCount));
		custom_exprs = lappend(custom_exprs, copyObject(q->limitOffset));
	}
	for (i = 0; i < BS_INT_COUNT; i++)
		ints = lappend_int(ints, 0);
	list_nth_cell(ints, BS_INT_SHAPE)->int_value = direct ? a->shape : BS_SHAPE_ROWS;
	list_nth_cell(ints, BS_INT_NPARAMS)->int_value = list_length(ship.param_exprs);
	list_nth_cell(ints, BS_INT_NPRUNE)->int_value = list_length(a->prune_exprs);
	list_nth_cell(ints, BS_INT_HAS_LIMIT)->int_value = has_limit;
	list_nth_cell(ints, BS_INT_LIMIT_PARAM)->int_value = limit_param;
	list_nth_cell(ints, BS_INT_BINARY)->int_value = binary;
	list_nth_cell(ints, BS_INT_CURSOR_OPTIONS)->int_value = cursorOptions;
	list_nth_cell(ints, BS_INT_SKIP_SCAN)->int_value = skip.applies;
	list_nth_cell(ints, BS_INT_LEAF)->int_value = !direct;
	list_nth_cell(ints, BS_INT_REDISTINCT)->int_value = redistinct;
	list_nth_cell(ints, BS_INT_MERGE)->int_value = !skip.applies && !latest.applies;

	initStringInfo(&note);
	if (extra_note)
		appendStringInfoString(&note, extra_note);
	else
		appendStringInfoString(&note, a->shape == BS_SHAPE_ROWS ? "rows" :
							   a->shape == BS_SHAPE_BUILDING ? "grouped by building" : "single fragment");
	if (skip.applies)
		appendStringInfoString(&note, ", latest per meter by index skip scan");
	if (latest.applies)
		appendStringInfoString(&note, ", rows of each meter in ts order by index");
	if (redistinct > 0)
		appendStringInfoString(&note, ", DISTINCT ON again across the time pieces of a building");

	priv = bs_private(q, &fl, ints, sort_attno, sort_op, sort_coll, sort_nf, a->prune_kinds, note.data);
	{
		CustomScan *cscan = bs_make_custom_scan(tlist, custom_exprs, priv);

		cscan->custom_scan_tlist = scan_tlist;
		return cscan;
	}
}

/* The whole query as one custom scan: the plan is just that node. */
static PlannedStmt *
bs_plan_direct(Query *parse, BsAnalysis *a, int cursorOptions, int redistinct)
{
	CustomScan *cscan = bs_build_scan(parse, a, true, cursorOptions, NULL, redistinct);
	PlannedStmt *stmt = makeNode(PlannedStmt);
	RangeTblEntry *drte = rt_fetch(a->dist_rti, parse->rtable);
	RangeTblEntry *r = copyObject(drte);
	RTEPermissionInfo *perm = copyObject(list_nth(parse->rteperminfos, drte->perminfoindex - 1));
	List	   *frag_oids = list_nth(cscan->custom_private, BS_PRIV_FRAG_OIDS);	/* for invalidation */

	stmt->commandType = CMD_SELECT;
	stmt->queryId = parse->queryId;
	stmt->canSetTag = parse->canSetTag;
	stmt->planTree = (Plan *) cscan;
	/* the distributed table stays in the range table: it is locked and its privileges checked */
	r->perminfoindex = 1;
	stmt->rtable = list_make1(r);
	stmt->permInfos = list_make1(perm);
	stmt->unprunableRelids = bms_make_singleton(1);
	stmt->relationOids = lappend_oid(list_copy(frag_oids), a->dist);
	stmt->stmt_location = parse->stmt_location;
	stmt->stmt_len = parse->stmt_len;
	return stmt;
}

/* ---------------------------------------------------------------- two-phase aggregates */

/* set while PostgreSQL plans the combine query of a two-phase aggregate */
static Query *bs_pending_partial = NULL;
static BsAnalysis *bs_pending_analysis = NULL;
static int	bs_pending_cursor = 0;
static set_rel_pathlist_hook_type prev_set_rel_pathlist = NULL;

static CustomPathMethods bs_path_methods;

static Plan *
bs_plan_custom_path(PlannerInfo *root, RelOptInfo *rel, CustomPath *best_path, List *tlist,
					List *clauses, List *custom_plans)
{
	CustomScan *cscan = copyObject((CustomScan *) linitial(best_path->custom_private));
	List	   *scan_tlist = NIL;
	List	   *local = NIL;
	ListCell   *lc;

	if (list_length(best_path->custom_private) == 1)
	{
		/*
		 * The partial subquery of a combine query: the workers return every column of it, in its
		 * order (the scan tuple). The plan above uses some (tlist, Vars of this rel); setrefs maps
		 * those onto the scan tuple and the node projects.
		 */
		RangeTblEntry *rte = planner_rt_fetch(rel->relid, root);

		foreach(lc, rte->subquery->targetList)
		{
			TargetEntry *tle = lfirst(lc);
			Var		   *v;

			if (tle->resjunk)
				continue;
			v = makeVar(rel->relid, tle->resno, exprType((Node *) tle->expr), exprTypmod((Node *) tle->expr),
						exprCollation((Node *) tle->expr), 0);
			scan_tlist = lappend(scan_tlist, makeTargetEntry((Expr *) v, tle->resno, tle->resname, false));
		}
		local = extract_actual_clauses(clauses, false);
	}
	else
	{
		/* readings in a larger query: the fetched columns; quals not sent are checked here */
		List	   *vars = lsecond(best_path->custom_private);
		List	   *shipped = lthird(best_path->custom_private);
		int			i = 0;

		foreach(lc, vars)
			scan_tlist = lappend(scan_tlist, makeTargetEntry((Expr *) copyObject(lfirst(lc)), ++i, NULL, false));
		foreach(lc, extract_actual_clauses(clauses, false))
			if (!list_member(shipped, lfirst(lc)))
				local = lappend(local, lfirst(lc));
	}
	cscan->scan.plan.targetlist = tlist;
	cscan->custom_scan_tlist = scan_tlist;
	cscan->scan.plan.qual = local;
	cscan->custom_plans = custom_plans;
	cscan->scan.plan.plan_rows = best_path->path.rows;
	return (Plan *) cscan;
}

static CustomPathMethods bs_path_methods = {
	.CustomName = "BuildSmart Distributed",
	.PlanCustomPath = bs_plan_custom_path,
};

/*
 * Vars of readings as the deparser of a one-relation context expects them: range table index 1,
 * no syntactic referent (a pulled-up sub-select leaves one pointing elsewhere), not nullable.
 */
static Node *
bs_local_vars_mutator(Node *node, Index *rti)
{
	if (node == NULL)
		return NULL;
	if (IsA(node, Var) && ((Var *) node)->varno == (int) *rti && ((Var *) node)->varlevelsup == 0)
	{
		Var		   *v = copyObject((Var *) node);

		v->varno = 1;
		v->varnosyn = 0;
		v->varattnosyn = 0;
		v->varnullingrels = NULL;
		return (Node *) v;
	}
	return expression_tree_mutator(node, bs_local_vars_mutator, rti);
}

/*
 * readings inside a query the planner cannot send whole (a join, a sub-select): the scan of
 * readings itself runs on the workers, all fragments at once, with every condition that can be
 * shipped, pruned on building when the plan runs (also by an InitPlan's value, as the join pruning
 * of dist_join.c produces). Offered as one more path, cheaper than postgres_fdw's Append.
 */
static void
bs_add_scan_path(PlannerInfo *root, RelOptInfo *rel, Index rti, Oid dist)
{
	BsShipContext ship;
	List	   *shipped = NIL;
	List	   *local = NIL;
	List	   *vars = NIL;
	List	   *pulled;
	ListCell   *lc;
	const char *reason = NULL;
	BsAnalysis	a;
	Path	   *child = NULL;
	CustomPath *cp;
	CustomScan *cscan;
	List	   *all_quals = NIL;
	BsFragLists fl = {0};
	List	   *ints = NIL;
	List	   *priv = NIL;
	StringInfoData cols;
	char	   *where = NULL;
	bool		binary = true;
	int			i;
	List	   *ctx;
	int			nest;
	Node	   *wquals;

	if (root->parse->commandType != CMD_SELECT || root->parse->rowMarks != NIL ||
		rel->reloptkind != RELOPT_BASEREL || rel->pathlist == NIL)
		return;
	memset(&ship, 0, sizeof(ship));
	ship.dist_rti = rti;
	ship.allow_exec_params = true;
	foreach(lc, rel->baserestrictinfo)
	{
		RestrictInfo *ri = lfirst(lc);

		all_quals = lappend(all_quals, ri->clause);
		if (bs_expr_shippable((Node *) ri->clause, &ship))
			shipped = lappend(shipped, ri->clause);
		else
			local = lappend(local, ri->clause);
	}
	pulled = pull_var_clause((Node *) list_concat(list_copy(rel->reltarget->exprs), local), PVC_INCLUDE_PLACEHOLDERS);
	foreach(lc, pulled)
	{
		Var		   *v = lfirst(lc);

		if (!IsA(v, Var) || v->varno != (int) rti || v->varattno <= 0 || v->varlevelsup != 0)
			return;				/* placeholders, whole-row or system columns: leave it to postgres_fdw */
		if (!bs_type_is_builtin(v->vartype))
			binary = false;
		vars = list_append_unique(vars, v);
	}
	memset(&a, 0, sizeof(a));
	a.dist = dist;
	a.dist_rti = rti;
	a.a_building = get_attnum(dist, "building");
	a.fragments = bs_load_fragments(dist, &reason);
	if (a.fragments == NIL)
		return;
	bs_pruning_dist = dist;
	bs_find_pruning((Node *) make_ands_explicit(all_quals), rti, a.a_building, &a.prune_exprs, &a.prune_kinds);
	a.fragments = bs_prune_static(a.fragments, a.prune_exprs, a.prune_kinds, root->glob->boundParams);

	/* the statement: SELECT <columns> FROM <fragment> readings WHERE <shipped conditions> */
	ship.param_exprs = NIL;
	wquals = shipped ? (Node *) make_ands_explicit(copyObject(shipped)) : NULL;
	if (wquals)
	{
		wquals = bs_extract_params(wquals, &ship);
		wquals = bs_local_vars_mutator(wquals, &rti);
	}
	foreach(lc, a.fragments)
	{
		BsFragment *f = lfirst(lc);
		StringInfoData sql;
		ListCell   *lv;
		bool		first = true;

		bs_set_transmission_modes(&nest);
		PG_TRY();
		{
			ctx = deparse_context_for("readings", f->relid);
			initStringInfo(&cols);
			foreach(lv, vars)
			{
				Node	   *v = bs_local_vars_mutator(lfirst(lv), &rti);

				appendStringInfo(&cols, "%s%s", first ? "" : ", ", deparse_expression(v, ctx, true, false));
				first = false;
			}
			where = wquals ? deparse_expression(wquals, ctx, true, false) : NULL;
		}
		PG_FINALLY();
		{
			bs_reset_transmission_modes(nest);
		}
		PG_END_TRY();
		initStringInfo(&sql);
		appendStringInfo(&sql, "SELECT %s FROM %s readings", cols.data, f->qualified_name);
		if (where)
			appendStringInfo(&sql, " WHERE %s", where);
		bs_add_fragment(&fl, f, sql.data);
	}
	if (fl.oids == NIL)
		return;

	for (i = 0; i < BS_INT_COUNT; i++)
		ints = lappend_int(ints, 0);
	list_nth_cell(ints, BS_INT_SHAPE)->int_value = BS_SHAPE_ROWS;
	list_nth_cell(ints, BS_INT_NPARAMS)->int_value = list_length(ship.param_exprs);
	list_nth_cell(ints, BS_INT_NPRUNE)->int_value = list_length(a.prune_exprs);
	list_nth_cell(ints, BS_INT_BINARY)->int_value = binary;
	list_nth_cell(ints, BS_INT_LEAF)->int_value = 1;
	priv = bs_private(root->parse, &fl, ints, NIL, NIL, NIL, NIL, a.prune_kinds, "scan of readings in a larger query");
	cscan = bs_make_custom_scan(NIL, list_concat(list_copy(ship.param_exprs), a.prune_exprs), priv);

	foreach(lc, rel->pathlist)
	{
		Path	   *p = lfirst(lc);

		if (p->param_info == NULL && (child == NULL || p->total_cost < child->total_cost))
			child = p;
	}
	if (child == NULL)
		return;
	cp = makeNode(CustomPath);
	cp->path.pathtype = T_CustomScan;
	cp->path.parent = rel;
	cp->path.pathtarget = rel->reltarget;
	cp->path.rows = rel->rows;
	/* one round trip per node, all nodes at once, no cursor: cheaper than the Append it replaces */
	cp->path.startup_cost = child->startup_cost * 0.5;
	cp->path.total_cost = child->total_cost * 0.5;
	cp->custom_paths = list_make1(child);
	cp->custom_private = list_make3(cscan, vars, shipped);
	cp->methods = &bs_path_methods;
	add_path(rel, (Path *) cp);
	if (bs_log_pushdown)
		elog(LOG, "buildsmart: scan path for readings (%d fragment(s), %d condition(s) sent, cost %.1f vs %.1f)",
			 list_length(fl.oids), list_length(shipped), cp->path.total_cost, child->total_cost);
}

/*
 * The subquery "bs_partial" of a combine query: its rows come from the workers. The plan
 * PostgreSQL made for it stays as the child, run only when this execution falls back.
 */
static void
bs_set_rel_pathlist(PlannerInfo *root, RelOptInfo *rel, Index rti, RangeTblEntry *rte)
{
	if (prev_set_rel_pathlist)
		prev_set_rel_pathlist(root, rel, rti, rte);
	if (bs_pending_partial != NULL && rte->rtekind == RTE_SUBQUERY && rte->alias != NULL &&
		strcmp(rte->alias->aliasname, "bs_partial") == 0 && rel->pathlist != NIL &&
		rel->reloptkind == RELOPT_BASEREL && rel->baserestrictinfo == NIL)
	{
		CustomPath *cp = makeNode(CustomPath);
		Path	   *child = linitial(rel->pathlist);	/* cheapest total after add_path */
		CustomScan *leaf = bs_build_scan(bs_pending_partial, bs_pending_analysis, false,
										 bs_pending_cursor, "partial aggregate per fragment", 0);
		ListCell   *lc;

		foreach(lc, rel->pathlist)
		{
			Path	   *p = lfirst(lc);

			if (p->param_info == NULL && p->total_cost < child->total_cost)
				child = p;
		}
		cp->path.pathtype = T_CustomScan;
		cp->path.parent = rel;
		cp->path.pathtarget = rel->reltarget;
		cp->path.param_info = NULL;
		cp->path.parallel_aware = false;
		cp->path.parallel_safe = false;
		cp->path.parallel_workers = 0;
		cp->path.rows = child->rows;
		cp->path.startup_cost = 0;
		cp->path.total_cost = 0;
		cp->path.pathkeys = NIL;
		cp->flags = 0;
		cp->custom_paths = list_make1(child);
		cp->custom_private = list_make1(leaf);
		cp->methods = &bs_path_methods;
		rel->pathlist = NIL;
		rel->partial_pathlist = NIL;
		add_path(rel, (Path *) cp);
		bs_pending_partial = NULL;	/* one leaf per combine query */
		return;
	}
	if (bs_enable_pushdown && !bs_planning_fallback && bs_pending_partial == NULL &&
		rte->rtekind == RTE_RELATION && rte->inh && rte->relkind == RELKIND_PARTITIONED_TABLE &&
		bs_is_distributed(rte->relid))
		bs_add_scan_path(root, rel, rti, rte->relid);
}

static PlannedStmt *
bs_plan_two_phase(Query *parse, BsAnalysis *a, int cursorOptions, ParamListInfo bound,
				  const char **reason)
{
	BsCombine  *c = bs_build_combine(parse, a->dist, a->dist_rti, a->group_rti, reason);
	PlannedStmt *stmt;
	RangeTblEntry *sub = NULL;
	ListCell   *lc;
	BsAnalysis	pa;

	if (c == NULL)
		return NULL;
	foreach(lc, c->query->rtable)
	{
		RangeTblEntry *rte = lfirst(lc);

		if (rte->rtekind == RTE_SUBQUERY && rte->alias && strcmp(rte->alias->aliasname, "bs_partial") == 0)
			sub = rte;
	}
	if (sub == NULL)
	{
		*reason = "combine query without its partial subquery";
		return NULL;
	}
	if (!bs_analyze(sub->subquery, a->dist, bound, &pa, reason))
		return NULL;
	bs_pending_partial = copyObject(sub->subquery);
	bs_pending_analysis = &pa;
	bs_pending_cursor = cursorOptions;
	PG_TRY();
	{
		stmt = standard_planner(c->query, c->sql, cursorOptions, bound);
	}
	PG_FINALLY();
	{
		bs_pending_partial = NULL;
		bs_pending_analysis = NULL;
	}
	PG_END_TRY();
	stmt->queryId = parse->queryId;
	stmt->stmt_location = parse->stmt_location;
	stmt->stmt_len = parse->stmt_len;
	return stmt;
}

/* ---------------------------------------------------------------- INSERT */

/*
 * INSERT INTO readings VALUES (...): when every row belongs to one fragment and the statement is a
 * transaction of its own, one statement on that worker (which commits with it) replaces
 * postgres_fdw's five round trips. Inside a transaction block, or when rows span fragments, the
 * executor runs PostgreSQL's plan instead, so the write stays atomic with the transaction.
 */
static PlannedStmt *
bs_plan_insert(Query *parse, Oid dist, int cursorOptions, ParamListInfo bound, const char **reason)
{
	RangeTblEntry *target = rt_fetch(parse->resultRelation, parse->rtable);
	RangeTblEntry *values_rte = NULL;
	Index		values_rti = 0;
	Index		rti = 0;
	ListCell   *lc;
	BsShipContext ship;
	BsAnalysis	a;
	AttrNumber	a_building = get_attnum(dist, "building");
	List	   *rows = NIL;		/* per row: List of (resno, expr) as TargetEntries */
	Query	   *wq;
	BsFragLists fl = {0};
	List	   *prune_kinds = NIL;
	List	   *ints = NIL;
	List	   *priv = NIL;
	List	   *tlist = NIL,
			   *scan_tlist = NIL;
	List	   *custom_exprs;
	CustomScan *cscan;
	PlannedStmt *stmt;
	bool		binary = true;
	int			i;

	if (parse->cteList || parse->hasSubLinks || parse->hasModifyingCTE || parse->hasRowSecurity ||
		parse->override != OVERRIDING_NOT_SET || parse->mergeActionList)
	{
		*reason = "INSERT with CTEs, sub-selects or OVERRIDING";
		return NULL;
	}
	if (parse->onConflict != NULL)
	{
		*reason = "INSERT ... ON CONFLICT (postgres_fdw does not support it either)";
		return NULL;
	}
	foreach(lc, parse->rtable)
	{
		RangeTblEntry *rte = lfirst(lc);

		rti++;
		if (rti == (Index) parse->resultRelation)
			continue;
		if (rte->rtekind == RTE_VALUES && values_rte == NULL)
		{
			values_rte = rte;
			values_rti = rti;
		}
		else
		{
			*reason = "INSERT ... SELECT";
			return NULL;
		}
	}
	memset(&ship, 0, sizeof(ship));
	ship.dist_rti = parse->resultRelation;
	if (!bs_expr_shippable((Node *) parse->returningList, &ship))
	{
		*reason = ship.reason;
		return NULL;
	}

	/* the value of each target column in each row */
	if (values_rte == NULL)
		rows = list_make1(parse->targetList);
	else
	{
		foreach(lc, values_rte->values_lists)
		{
			List	   *vals = lfirst(lc);
			List	   *row = NIL;
			ListCell   *lt;

			foreach(lt, parse->targetList)
			{
				TargetEntry *tle = lfirst(lt);
				Node	   *e = (Node *) tle->expr;

				while (e && IsA(e, RelabelType))
					e = (Node *) ((RelabelType *) e)->arg;
				if (!IsA(e, Var) || ((Var *) e)->varno != (int) values_rti)
				{
					*reason = "INSERT whose target list is not the VALUES columns";
					return NULL;
				}
				row = lappend(row, makeTargetEntry((Expr *) list_nth(vals, ((Var *) e)->varattno - 1),
												   tle->resno, tle->resname, false));
			}
			rows = lappend(rows, row);
		}
	}
	foreach(lc, rows)
	{
		ListCell   *lt;

		foreach(lt, (List *) lfirst(lc))
		{
			TargetEntry *tle = lfirst(lt);

			if (contain_vars_of_level((Node *) tle->expr, 0) || contain_volatile_functions((Node *) tle->expr) ||
				contain_subplans((Node *) tle->expr))
			{
				*reason = "INSERT values that are not plain expressions";
				return NULL;
			}
		}
	}

	/* routing: the building of every row selects the fragment */
	memset(&a, 0, sizeof(a));
	a.dist = dist;
	a.fragments = bs_load_fragments(dist, reason);
	if (a.fragments == NIL)
		return NULL;
	foreach(lc, rows)
	{
		ListCell   *lt;

		foreach(lt, (List *) lfirst(lc))
		{
			TargetEntry *tle = lfirst(lt);

			if (tle->resno == a_building)
			{
				a.prune_exprs = lappend(a.prune_exprs, copyObject(tle->expr));
				prune_kinds = lappend_int(prune_kinds, BS_PRUNE_EQ);
			}
			else if (tle->resno == get_attnum(dist, "ts") && exprType((Node *) tle->expr) == TIMESTAMPTZOID)
			{
				/* a building split by time: its row goes to the piece of its ts */
				a.prune_exprs = lappend(a.prune_exprs, copyObject(tle->expr));
				prune_kinds = lappend_int(prune_kinds, BS_PRUNE_TS_EQ);
			}
		}
	}
	if (a.prune_exprs == NIL)
	{
		*reason = "INSERT without a building";
		return NULL;
	}
	a.fragments = bs_prune_static(a.fragments, a.prune_exprs, prune_kinds, bound);
	if (a.fragments == NIL)
	{
		*reason = "INSERT whose rows span several fragments";
		return NULL;
	}

	/* the statement for each fragment: values as worker parameters */
	wq = copyObject(parse);
	ship.param_exprs = NIL;
	if (values_rte == NULL)
		wq->targetList = (List *) bs_extract_params((Node *) wq->targetList, &ship);
	else
	{
		RangeTblEntry *v = rt_fetch(values_rti, wq->rtable);

		v->values_lists = (List *) bs_extract_params((Node *) v->values_lists, &ship);
	}
	wq->returningList = (List *) bs_extract_params((Node *) wq->returningList, &ship);
	foreach(lc, a.fragments)
	{
		BsFragment *f = lfirst(lc);
		RangeTblEntry *r = rt_fetch(wq->resultRelation, wq->rtable);

		r->relid = f->relid;
		r->relkind = RELKIND_FOREIGN_TABLE;
		bs_add_fragment(&fl, f, bs_deparse_query(wq));
	}

	/* RETURNING rows are the output */
	i = 0;
	foreach(lc, parse->returningList)
	{
		TargetEntry *tle = lfirst(lc);
		Node	   *expr = copyObject((Node *) tle->expr);

		i++;
		if (!bs_type_is_builtin(exprType(expr)))
			binary = false;
		if (parse->resultRelation != 1)
			ChangeVarNodes(expr, parse->resultRelation, 1, 0);
		scan_tlist = lappend(scan_tlist, makeTargetEntry((Expr *) expr, i, tle->resname, false));
		tlist = lappend(tlist, makeTargetEntry((Expr *) makeVar(INDEX_VAR, i, exprType(expr), exprTypmod(expr),
																exprCollation(expr), 0),
											   i, tle->resname, tle->resjunk));
	}

	custom_exprs = list_concat(list_copy(ship.param_exprs), a.prune_exprs);
	for (i = 0; i < BS_INT_COUNT; i++)
		ints = lappend_int(ints, 0);
	list_nth_cell(ints, BS_INT_SHAPE)->int_value = BS_SHAPE_SINGLE;
	list_nth_cell(ints, BS_INT_NPARAMS)->int_value = list_length(ship.param_exprs);
	list_nth_cell(ints, BS_INT_NPRUNE)->int_value = list_length(a.prune_exprs);
	list_nth_cell(ints, BS_INT_BINARY)->int_value = binary;
	list_nth_cell(ints, BS_INT_CURSOR_OPTIONS)->int_value = cursorOptions;
	list_nth_cell(ints, BS_INT_INSERT)->int_value = 1;
	priv = bs_private(parse, &fl, ints, NIL, NIL, NIL, NIL, prune_kinds,
					  psprintf("INSERT of %d row(s) into one fragment", list_length(rows)));
	cscan = bs_make_custom_scan(tlist, custom_exprs, priv);
	cscan->custom_scan_tlist = scan_tlist;

	stmt = makeNode(PlannedStmt);
	stmt->commandType = CMD_INSERT;
	stmt->queryId = parse->queryId;
	stmt->hasReturning = parse->returningList != NIL;
	stmt->canSetTag = parse->canSetTag;
	stmt->planTree = (Plan *) cscan;
	{
		RangeTblEntry *r = copyObject(target);
		RTEPermissionInfo *perm = copyObject(list_nth(parse->rteperminfos, target->perminfoindex - 1));

		r->perminfoindex = 1;
		stmt->rtable = list_make1(r);
		stmt->permInfos = list_make1(perm);
	}
	stmt->unprunableRelids = bms_make_singleton(1);
	stmt->relationOids = lappend_oid(list_copy(fl.oids), dist);
	stmt->stmt_location = parse->stmt_location;
	stmt->stmt_len = parse->stmt_len;
	return stmt;
}

/* ---------------------------------------------------------------- the hook */

static PlannedStmt *
bs_try_distribute(Query *parse, int cursorOptions, ParamListInfo bound, Oid dist, const char **reason)
{
	BsAnalysis	a;

	if (cursorOptions & CURSOR_OPT_SCROLL)
	{
		*reason = "a scrollable cursor";
		return NULL;
	}
	if (!bs_analyze(parse, dist, bound, &a, reason))
		return NULL;
	if (a.shape == BS_SHAPE_BUILDING && list_length(a.fragments) > 1)
	{
		/*
		 * A building split by time has several fragments: groups keyed by building are no longer
		 * complete on one worker. DISTINCT ON is repeated on the coordinator over the merged
		 * stream; aggregates go in two phases; anything else is not keyed well enough.
		 */
		ListCell   *lc;
		bool		pieces = false;

		foreach(lc, a.fragments)
			pieces = pieces || ((BsFragment *) lfirst(lc))->time_piece;
		if (pieces)
		{
			if (parse->hasDistinctOn && !parse->hasAggs && parse->groupClause == NIL &&
				!parse->hasWindowFuncs && list_length(parse->sortClause) >= list_length(parse->distinctClause))
				return bs_plan_direct(parse, &a, cursorOptions, list_length(parse->distinctClause));
			a.shape = BS_SHAPE_SINGLE;
		}
	}
	if (a.shape != BS_SHAPE_SINGLE || list_length(a.fragments) <= 1 ||
		(a.prune_exprs != NIL && !parse->hasAggs && parse->groupClause == NIL))
		return bs_plan_direct(parse, &a, cursorOptions, 0);
	/* aggregates not keyed by building over several fragments: partial on the workers */
	if ((parse->hasAggs || parse->groupClause) && !parse->hasWindowFuncs && parse->distinctClause == NIL &&
		!parse->hasTargetSRFs)
	{
		PlannedStmt *stmt = bs_plan_two_phase(parse, &a, cursorOptions, bound, reason);

		if (stmt != NULL)
			return stmt;
		/* a parameter may still select one fragment: run directly, falling back when it does not */
		if (a.prune_exprs != NIL)
			return bs_plan_direct(parse, &a, cursorOptions, 0);
		return NULL;
	}
	if (a.prune_exprs != NIL)
		return bs_plan_direct(parse, &a, cursorOptions, 0);
	*reason = "a DISTINCT or window not keyed by building over several fragments";
	return NULL;
}

static PlannedStmt *
bs_planner(Query *parse, const char *query_string, int cursorOptions, ParamListInfo boundParams)
{
	PlannedStmt *stmt = NULL;

	if (bs_enable_pushdown && !bs_planning_fallback && bs_pending_partial == NULL &&
		parse->commandType == CMD_SELECT && parse->rtable != NIL)
	{
		ListCell   *lc;
		Oid			dist = InvalidOid;

		foreach(lc, parse->rtable)
		{
			RangeTblEntry *rte = lfirst(lc);

			if (rte->rtekind == RTE_RELATION && rte->relkind == RELKIND_PARTITIONED_TABLE &&
				!OidIsValid(dist) && bs_is_distributed(rte->relid))
				dist = rte->relid;
		}
		if (OidIsValid(dist))
		{
			const char *reason = NULL;

			stmt = bs_try_distribute(parse, cursorOptions, boundParams, dist, &reason);
			if (stmt == NULL && bs_log_pushdown)
				elog(LOG, "buildsmart: not pushed down: %s", reason ? reason : "?");
			else if (stmt != NULL && bs_log_pushdown)
				elog(LOG, "buildsmart: pushed down");
			if (stmt == NULL)
				(void) bs_add_join_pruning(parse, dist);
		}
	}
	if (bs_enable_pushdown && !bs_planning_fallback && bs_pending_partial == NULL &&
		parse->commandType == CMD_INSERT && parse->resultRelation > 0)
	{
		RangeTblEntry *target = rt_fetch(parse->resultRelation, parse->rtable);

		if (target->relkind == RELKIND_PARTITIONED_TABLE && bs_is_distributed(target->relid))
		{
			const char *reason = NULL;

			stmt = bs_plan_insert(parse, target->relid, cursorOptions, boundParams, &reason);
			if (bs_log_pushdown)
				elog(LOG, "buildsmart: INSERT %s%s", stmt ? "routed" : "not routed: ", stmt ? "" : reason);
		}
	}
	if (stmt == NULL)
		stmt = bs_next_planner(parse, query_string, cursorOptions, boundParams);
	if (parse->commandType == CMD_UPDATE || parse->commandType == CMD_DELETE || parse->hasModifyingCTE)
		bs_check_fragment_modify(stmt);
	return stmt;
}

void
bs_planner_init(void)
{
	prev_planner = planner_hook;
	planner_hook = bs_planner;
	prev_set_rel_pathlist = set_rel_pathlist_hook;
	set_rel_pathlist_hook = bs_set_rel_pathlist;
}

/* ---------------------------------------------------------------- routing (COPY router) */

/* The fragments of a distributed table as routing entries; NIL when the layout is not plain. */
List *
bs_routing_fragments(Oid dist)
{
	const char *reason = NULL;
	List	   *frags = bs_load_fragments(dist, &reason);
	List	   *out = NIL;
	ListCell   *lc;

	foreach(lc, frags)
	{
		BsFragment *f = lfirst(lc);
		BsRoute    *r = palloc0(sizeof(BsRoute));

		r->relid = f->relid;
		r->qualified_name = f->qualified_name;
		r->lower = f->lower;
		r->upper = f->upper;
		r->time_piece = f->time_piece;
		r->ts_lower = f->ts_lower;
		r->ts_upper = f->ts_upper;
		out = lappend(out, r);
	}
	if (out == NIL && bs_log_pushdown)
		elog(LOG, "buildsmart: COPY not routed: %s", reason ? reason : "no fragments");
	return out;
}

bool
bs_building_in_range(Const *lower, Const *upper, Datum building)
{
	if (lower != NULL && !lower->constisnull && bs_cmp_c(building, lower->constvalue) < 0)
		return false;
	if (upper != NULL && !upper->constisnull && bs_cmp_c(building, upper->constvalue) >= 0)
		return false;
	return true;
}
