/*
 * dist_deparse.c: what may run on a worker, and the SQL a worker receives.
 *
 * The worker statement is PostgreSQL's own deparse (pg_get_querydef) of the query with the
 * distributed table replaced by one fragment, printed with search_path = pg_catalog so every name
 * that is not built in is schema-qualified, and with ISO dates and exact floats so constants mean
 * the same on the worker.
 *
 * Shipping rules (why each):
 *  - immutable built-in functions and operators, and those of this extension: same result anywhere;
 *  - stable built-ins that depend only on the datetime settings (date_trunc(text, timestamptz),
 *    extract, casts between timestamp types, timestamptz +/- interval, ...): the remote session
 *    gets the local TimeZone/DateStyle/IntervalStyle first (remote.c), so they agree; this is what
 *    lets date_trunc('day', ts) or ts AT TIME ZONE 'Europe/London' run next to the data;
 *  - an expression without column references that is not immutable (now(), $1 + interval '1 day',
 *    current_date) is evaluated once on the coordinator and sent as a parameter: a worker's now()
 *    is its own transaction's start, not the query's;
 *  - volatile functions, sub-selects, and objects a worker does not have keep the query on the
 *    coordinator (PostgreSQL's own plan through postgres_fdw).
 */
#include "buildsmart.h"

#include "access/htup_details.h"
#include "catalog/namespace.h"
#include "catalog/pg_proc.h"
#include "catalog/pg_type.h"
#include "nodes/makefuncs.h"
#include "nodes/nodeFuncs.h"
#include "optimizer/optimizer.h"
#include "utils/builtins.h"
#include "utils/guc.h"
#include "utils/hsearch.h"
#include "utils/lsyscache.h"
#include "utils/ruleutils.h"
#include "utils/syscache.h"
#include "utils/typcache.h"

#define BS_SCHEMA "buildsmart"

typedef struct BsFuncEntry
{
	Oid			funcid;
	bool		shippable;
} BsFuncEntry;

static HTAB *bs_func_cache = NULL;
static Oid	bs_schema_oid = InvalidOid;

static Oid
bs_schema(void)
{
	/* not cached across a DROP/CREATE EXTENSION in the same session; cheap syscache lookup */
	bs_schema_oid = get_namespace_oid(BS_SCHEMA, true);
	return bs_schema_oid;
}

bool
bs_type_is_builtin(Oid typid)
{
	return typid < FirstNormalObjectId;
}

/* Types a worker knows under the same name: built-ins and those of this extension. */
static bool
bs_type_shippable(Oid typid)
{
	HeapTuple	tup;
	Oid			nsp;

	if (bs_type_is_builtin(typid))
		return true;
	tup = SearchSysCache1(TYPEOID, ObjectIdGetDatum(typid));
	if (!HeapTupleIsValid(tup))
		return false;
	nsp = ((Form_pg_type) GETSTRUCT(tup))->typnamespace;
	ReleaseSysCache(tup);
	return OidIsValid(bs_schema()) && nsp == bs_schema_oid;
}

/* Argument and result types of a stable built-in that may be shipped with synced settings. */
static bool
bs_datetime_safe_type(Oid t)
{
	switch (t)
	{
		case TIMESTAMPTZOID:
		case TIMESTAMPOID:
		case DATEOID:
		case TIMEOID:
		case TIMETZOID:
		case INTERVALOID:
		case TEXTOID:
		case VARCHAROID:
		case BPCHAROID:
		case CSTRINGOID:
		case INT2OID:
		case INT4OID:
		case INT8OID:
		case FLOAT4OID:
		case FLOAT8OID:
		case NUMERICOID:
		case BOOLOID:
			return true;
		default:
			return false;
	}
}

static bool
bs_compute_func_shippable(Oid funcid)
{
	HeapTuple	tup;
	Form_pg_proc p;
	bool		ok = false;
	const char *name;
	int			i;

	tup = SearchSysCache1(PROCOID, ObjectIdGetDatum(funcid));
	if (!HeapTupleIsValid(tup))
		return false;
	p = (Form_pg_proc) GETSTRUCT(tup);
	name = NameStr(p->proname);
	if (p->provolatile == PROVOLATILE_VOLATILE)
		ok = false;
	else if (funcid >= FirstNormalObjectId)
		ok = OidIsValid(bs_schema()) && p->pronamespace == bs_schema_oid;
	else if (p->provolatile == PROVOLATILE_IMMUTABLE)
		ok = true;
	else
	{
		/* stable built-in: only those whose result depends on nothing but the datetime settings */
		ok = bs_datetime_safe_type(p->prorettype) &&
			strncmp(name, "pg_", 3) != 0 && strncmp(name, "has_", 4) != 0 &&
			strncmp(name, "to_", 3) != 0 && strcmp(name, "current_setting") != 0 &&
			strcmp(name, "now") != 0 && strcmp(name, "transaction_timestamp") != 0 &&
			strcmp(name, "statement_timestamp") != 0 && strcmp(name, "timeofday") != 0;
		for (i = 0; ok && i < p->pronargs; i++)
			ok = bs_datetime_safe_type(p->proargtypes.values[i]);
		if (ok && p->proretset)
			ok = strcmp(name, "generate_series") == 0;
	}
	ReleaseSysCache(tup);
	return ok;
}

static bool
bs_func_shippable(Oid funcid)
{
	BsFuncEntry *e;
	bool		found;

	if (bs_func_cache == NULL)
	{
		HASHCTL		ctl;

		ctl.keysize = sizeof(Oid);
		ctl.entrysize = sizeof(BsFuncEntry);
		bs_func_cache = hash_create("buildsmart shippable functions", 256, &ctl, HASH_ELEM | HASH_BLOBS);
	}
	e = hash_search(bs_func_cache, &funcid, HASH_ENTER, &found);
	if (!found)
		e->shippable = bs_compute_func_shippable(funcid);
	return e->shippable;
}

static bool bs_row_dependent_walker(Node *node, void *ctx);
static bool bs_subselect_walker(Node *node, void *ctx);

static bool
bs_shippable_walker(Node *node, BsShipContext *ctx)
{
	if (node == NULL)
		return false;

	/*
	 * Column-free and not volatile (now(), current_date, $1::date + 1): the coordinator evaluates
	 * it and sends the value, so the worker need not know how.
	 */
	if (!IsA(node, List) && !IsA(node, TargetEntry) && !IsA(node, CaseWhen) && !IsA(node, SortGroupClause) &&
		!bs_row_dependent_walker(node, NULL) && !bs_subselect_walker(node, &ctx->allow_exec_params) &&
		!contain_volatile_functions(node))
		return false;
	switch (nodeTag(node))
	{
		case T_Var:
			{
				Var		   *v = (Var *) node;

				if (v->varlevelsup != 0 || (v->varno != (int) ctx->dist_rti && v->varno != (int) ctx->group_rti))
				{
					ctx->reason = "a column of another relation";
					return true;
				}
				if (v->varattno <= 0 && v->varno == (int) ctx->dist_rti)
				{
					/* tableoid, ctid, a whole row: they mean other things on a worker */
					ctx->reason = "a system column or whole-row reference";
					return true;
				}
				if (!bs_type_shippable(v->vartype))
				{
					ctx->reason = "a column of a type workers do not know";
					return true;
				}
				return false;
			}
		case T_Const:
			if (!bs_type_shippable(((Const *) node)->consttype))
			{
				ctx->reason = "a constant of a type workers do not know";
				return true;
			}
			return false;
		case T_Param:
			if (((Param *) node)->paramkind != PARAM_EXTERN &&
				!(ctx->allow_exec_params && ((Param *) node)->paramkind == PARAM_EXEC))
			{
				ctx->reason = "a sub-select parameter";
				return true;
			}
			return false;
		case T_FuncExpr:
			if (!bs_func_shippable(((FuncExpr *) node)->funcid))
			{
				ctx->reason = "a function that cannot run on a worker";
				return true;
			}
			break;
		case T_OpExpr:
		case T_DistinctExpr:
		case T_NullIfExpr:
			set_opfuncid((OpExpr *) node);
			if (!bs_func_shippable(((OpExpr *) node)->opfuncid))
			{
				ctx->reason = "an operator that cannot run on a worker";
				return true;
			}
			break;
		case T_ScalarArrayOpExpr:
			set_sa_opfuncid((ScalarArrayOpExpr *) node);
			if (!bs_func_shippable(((ScalarArrayOpExpr *) node)->opfuncid))
			{
				ctx->reason = "an operator that cannot run on a worker";
				return true;
			}
			break;
		case T_Aggref:
			{
				Aggref	   *a = (Aggref *) node;

				if (a->aggfnoid >= FirstNormalObjectId &&
					!(OidIsValid(bs_schema()) && get_func_namespace(a->aggfnoid) == bs_schema_oid))
				{
					ctx->reason = "an aggregate that workers do not have";
					return true;
				}
				if (a->agglevelsup != 0)
				{
					ctx->reason = "an outer aggregate";
					return true;
				}
				break;
			}
		case T_WindowFunc:
			if (((WindowFunc *) node)->winfnoid >= FirstNormalObjectId)
			{
				ctx->reason = "a window function that workers do not have";
				return true;
			}
			break;
		case T_CoerceViaIO:
			{
				CoerceViaIO *c = (CoerceViaIO *) node;

				if (!bs_type_is_builtin(c->resulttype) || !bs_type_is_builtin(exprType((Node *) c->arg)))
				{
					ctx->reason = "a cast through text of a non-built-in type";
					return true;
				}
				break;
			}
		case T_ArrayCoerceExpr:
		case T_BoolExpr:
		case T_NullTest:
		case T_BooleanTest:
		case T_CaseExpr:
		case T_CaseWhen:
		case T_CaseTestExpr:
		case T_CoalesceExpr:
		case T_MinMaxExpr:
		case T_RelabelType:
		case T_ArrayExpr:
		case T_RowExpr:
		case T_CollateExpr:
		case T_FieldSelect:
		case T_SubscriptingRef:
		case T_SQLValueFunction:
		case T_TargetEntry:
		case T_SortGroupClause:
		case T_List:
			break;
		default:
			ctx->reason = "an expression form this planner does not ship";
			return true;
	}
	return expression_tree_walker(node, bs_shippable_walker, ctx);
}

/* True when every part of the expression may run on a worker (ctx->reason says why not). */
bool
bs_expr_shippable(Node *node, BsShipContext *ctx)
{
	return !bs_shippable_walker(node, ctx);
}

/* Sub-selects and executor parameters cannot be evaluated outside their plan. */
static bool
bs_subselect_walker(Node *node, void *ctx)
{
	bool		allow_exec = ctx != NULL && *(bool *) ctx;

	if (node == NULL)
		return false;
	if (IsA(node, SubLink) || IsA(node, SubPlan) || IsA(node, AlternativeSubPlan) ||
		(IsA(node, Param) && ((Param *) node)->paramkind != PARAM_EXTERN &&
		 !(allow_exec && ((Param *) node)->paramkind == PARAM_EXEC)))
		return true;
	return expression_tree_walker(node, bs_subselect_walker, ctx);
}

/* Is there anything in the tree that must be evaluated per row or per group on the worker? */
static bool
bs_row_dependent_walker(Node *node, void *ctx)
{
	if (node == NULL)
		return false;
	if (IsA(node, Var) || IsA(node, Aggref) || IsA(node, WindowFunc) || IsA(node, GroupingFunc) ||
		IsA(node, CaseTestExpr) || IsA(node, CoerceToDomainValue))
		return true;
	if (IsA(node, FuncExpr) && ((FuncExpr *) node)->funcretset)
		return true;
	if (IsA(node, OpExpr) && ((OpExpr *) node)->opretset)
		return true;
	return expression_tree_walker(node, bs_row_dependent_walker, ctx);
}

static bool
bs_contains_param_walker(Node *node, void *ctx)
{
	if (node == NULL)
		return false;
	if (IsA(node, Param))
		return true;
	return expression_tree_walker(node, bs_contains_param_walker, ctx);
}

/*
 * A parameter, or a column-free expression that is not a plain immutable constant expression:
 * the coordinator evaluates it once per execution and the worker receives $n.
 */
static bool
bs_coordinator_evaluates(Node *node)
{
	if (IsA(node, Param))
		return true;
	/* not expressions of their own (parts of CASE, sort clauses, target lists) */
	if (IsA(node, Const) || IsA(node, TargetEntry) || IsA(node, List) || IsA(node, CaseWhen) ||
		IsA(node, SortGroupClause))
		return false;
	if (bs_row_dependent_walker(node, NULL) || contain_volatile_functions(node))
		return false;
	return contain_mutable_functions(node) || bs_contains_param_walker(node, NULL);
}

static Node *
bs_extract_mutator(Node *node, BsShipContext *ctx)
{
	if (node == NULL)
		return NULL;
	if (bs_coordinator_evaluates(node))
	{
		Param	   *p = makeNode(Param);

		ctx->param_exprs = lappend(ctx->param_exprs, copyObject(node));
		p->paramkind = PARAM_EXTERN;
		p->paramid = list_length(ctx->param_exprs);
		p->paramtype = exprType(node);
		p->paramtypmod = exprTypmod(node);
		p->paramcollid = exprCollation(node);
		p->location = -1;
		return (Node *) p;
	}
	return expression_tree_mutator(node, bs_extract_mutator, ctx);
}

/* Replace parameters and column-free non-immutable expressions by worker parameters $1.. */
Node *
bs_extract_params(Node *node, BsShipContext *ctx)
{
	return bs_extract_mutator(node, ctx);
}

/*
 * Settings under which shipped SQL is printed: names qualified unless in pg_catalog (the worker
 * session's search_path), ISO dates, exact floats.
 */
void
bs_set_transmission_modes(int *nestlevel)
{
	*nestlevel = NewGUCNestLevel();
	(void) set_config_option("search_path", "pg_catalog", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	(void) set_config_option("datestyle", "ISO", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	(void) set_config_option("intervalstyle", "postgres", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
	(void) set_config_option("extra_float_digits", "3", PGC_USERSET, PGC_S_SESSION,
							 GUC_ACTION_SAVE, true, 0, false);
}

void
bs_reset_transmission_modes(int nestlevel)
{
	AtEOXact_GUC(true, nestlevel);
}

/*
 * pg_get_querydef indents with newlines; the statement sent (and shown by EXPLAIN) is one line.
 * Only whitespace outside string literals and quoted identifiers is touched.
 */
static void
bs_squash_whitespace(char *sql)
{
	char	   *in = sql;
	char	   *out = sql;
	char		quote = 0;
	bool		escapes = false;

	while (*in)
	{
		char		c = *in;

		if (quote)
		{
			*out++ = c;
			in++;
			if (escapes && c == '\\' && *in)
				*out++ = *in++;
			else if (c == quote)
			{
				if (*in == quote)
					*out++ = *in++; /* doubled quote inside */
				else
					quote = 0;
			}
			continue;
		}
		if (c == '\'' || c == '"')
		{
			quote = c;
			escapes = (c == '\'' && out > sql && (out[-1] == 'E' || out[-1] == 'e'));
			*out++ = c;
			in++;
			continue;
		}
		if (c == '\n')
		{
			while (out > sql && out[-1] == ' ')
				out--;
			while (*in == '\n' || *in == ' ' || *in == '\t')
				in++;
			if (out > sql && out[-1] != '(' && *in != ')')
				*out++ = ' ';
			continue;
		}
		*out++ = c;
		in++;
	}
	*out = '\0';
	/* pg_get_querydef starts with a space */
	if (sql[0] == ' ')
		memmove(sql, sql + 1, strlen(sql));
}

char *
bs_deparse_query(Query *query)
{
	int			nest;
	char	   *sql;

	bs_set_transmission_modes(&nest);
	PG_TRY();
	{
		sql = pg_get_querydef(query, false);
		bs_squash_whitespace(sql);
	}
	PG_FINALLY();
	{
		bs_reset_transmission_modes(nest);
	}
	PG_END_TRY();
	return sql;
}

/* The query's output expressions, comma-separated, deparsed against ``ctx``. */
static void
bs_append_targets(StringInfo buf, Query *query, List *ctx)
{
	ListCell   *lc;

	foreach(lc, query->targetList)
	{
		TargetEntry *tle = lfirst(lc);

		if (lc != list_head(query->targetList))
			appendStringInfoString(buf, ", ");
		appendStringInfoString(buf, deparse_expression((Node *) tle->expr, ctx, true, false));
	}
}

/*
 * Latest row per (building, meter) of one fragment as an index skip scan:
 *
 *   WITH RECURSIVE k AS (first key UNION ALL next key after k)   -- one index descent per key
 *   SELECT <targets> FROM k CROSS JOIN LATERAL (newest row of that key WHERE <quals>) readings
 *
 * instead of sorting every row of the fragment. Equivalent to
 *   SELECT DISTINCT ON (building, meter) <targets> FROM fragment WHERE <quals>
 *   ORDER BY building, meter, ts [DESC]
 * because (building, meter, ts) is the fragment's primary key: each key has at most one row at
 * each ts, so "the first row in ts order among those passing the quals" is one well-defined row,
 * and keys with no such row are dropped by the lateral join as DISTINCT ON would never see them.
 */
char *
bs_deparse_skip_scan(Query *query, Oid fragment, const char *qualified_name, bool ts_desc,
					 int limit_param)
{
	List	   *ctx;
	StringInfoData buf;
	int			nest;

	bs_set_transmission_modes(&nest);
	PG_TRY();
	{
		ctx = deparse_context_for("readings", fragment);
		initStringInfo(&buf);
		appendStringInfo(&buf,
						 "WITH RECURSIVE bs_keys(building, meter) AS ("
						 "(SELECT building, meter FROM %s ORDER BY building, meter LIMIT 1) "
						 "UNION ALL "
						 "SELECT n.building, n.meter FROM bs_keys k CROSS JOIN LATERAL "
						 "(SELECT x.building, x.meter FROM %s x WHERE (x.building, x.meter) > (k.building, k.meter) "
						 "ORDER BY x.building, x.meter LIMIT 1) n) "
						 "SELECT ",
						 qualified_name, qualified_name);
		bs_append_targets(&buf, query, ctx);
		appendStringInfo(&buf,
						 " FROM bs_keys k CROSS JOIN LATERAL (SELECT * FROM %s readings "
						 "WHERE readings.building = k.building AND readings.meter = k.meter",
						 qualified_name);
		if (query->jointree->quals != NULL)
			appendStringInfo(&buf, " AND (%s)",
							 deparse_expression(query->jointree->quals, ctx, true, false));
		appendStringInfo(&buf, " ORDER BY readings.ts%s LIMIT 1) readings ORDER BY readings.building, readings.meter",
						 ts_desc ? " DESC" : "");
		if (limit_param > 0)
			appendStringInfo(&buf, " LIMIT $%d", limit_param);
	}
	PG_FINALLY();
	{
		bs_reset_transmission_modes(nest);
	}
	PG_END_TRY();
	return buf.data;
}

/*
 * The newest (or oldest) n rows of a fragment in ts order, per (building, meter):
 *
 *   WITH RECURSIVE bs_keys AS (first key passing the quals UNION ALL next key after it)
 *   SELECT <targets> FROM bs_keys k CROSS JOIN LATERAL
 *     (n rows of that key WHERE <quals> ORDER BY ts [DESC] LIMIT n) readings
 *   ORDER BY <the query's sort keys, by position> LIMIT n
 *
 * instead of reading and sorting every row that passes the quals: a fragment table keeps a DEFAULT
 * time partition, so PostgreSQL cannot read its monthly partitions newest first and stop, but the
 * primary key (building, meter, ts) read backwards gives each meter's rows in ts order. Equivalent
 * to the query when its first sort key is ts: a row among the first n in (ts, ...) order is among
 * the first n of its own key in that order, which each key's subquery uses (ts first, so the
 * index order serves it). The planner only uses it when the quals fix the building, so the key
 * walk is one index descent per meter.
 */
char *
bs_deparse_latest_n(Query *query, Oid fragment, const char *qualified_name, const char *limit_text)
{
	List	   *ctx;
	StringInfoData buf;
	StringInfoData quals;
	ListCell   *lc;
	bool		first = true;
	int			nest;

	bs_set_transmission_modes(&nest);
	PG_TRY();
	{
		ctx = deparse_context_for("readings", fragment);
		initStringInfo(&quals);
		if (query->jointree->quals != NULL)
			appendStringInfo(&quals, " AND (%s)", deparse_expression(query->jointree->quals, ctx, true, false));
		initStringInfo(&buf);
		appendStringInfo(&buf,
						 "WITH RECURSIVE bs_keys(building, meter) AS ("
						 "(SELECT readings.building, readings.meter FROM %s readings WHERE true%s "
						 "ORDER BY readings.building, readings.meter LIMIT 1) "
						 "UNION ALL "
						 "SELECT n.building, n.meter FROM bs_keys k CROSS JOIN LATERAL "
						 "(SELECT readings.building, readings.meter FROM %s readings "
						 "WHERE (readings.building, readings.meter) > (k.building, k.meter)%s "
						 "ORDER BY readings.building, readings.meter LIMIT 1) n) "
						 "SELECT ",
						 qualified_name, quals.data, qualified_name, quals.data);
		bs_append_targets(&buf, query, ctx);
		/*
		 * Each key's rows in the query's whole order (ts first, so its index order serves): then
		 * no row of the answer is cut off even when a key has several rows at one ts.
		 */
		appendStringInfo(&buf,
						 " FROM bs_keys k CROSS JOIN LATERAL (SELECT * FROM %s readings "
						 "WHERE readings.building = k.building AND readings.meter = k.meter%s ORDER BY ",
						 qualified_name, quals.data);
		first = true;
		foreach(lc, query->sortClause)
		{
			SortGroupClause *sgc = lfirst(lc);
			TargetEntry *tle = get_sortgroupclause_tle(sgc, query->targetList);
			TypeCacheEntry *tc = lookup_type_cache(exprType((Node *) tle->expr), TYPECACHE_GT_OPR);

			/* the planner checked that each operator is its type's default < or > */
			appendStringInfo(&buf, "%s(%s)%s NULLS %s", first ? "" : ", ",
							 deparse_expression((Node *) tle->expr, ctx, true, false),
							 sgc->sortop == tc->gt_opr ? " DESC" : "", sgc->nulls_first ? "FIRST" : "LAST");
			first = false;
		}
		appendStringInfo(&buf, " LIMIT %s) readings ORDER BY ", limit_text);
		first = true;
		foreach(lc, query->sortClause)
		{
			SortGroupClause *sgc = lfirst(lc);
			TargetEntry *tle = get_sortgroupclause_tle(sgc, query->targetList);
			TypeCacheEntry *tc = lookup_type_cache(exprType((Node *) tle->expr), TYPECACHE_GT_OPR);

			appendStringInfo(&buf, "%s%d%s NULLS %s", first ? "" : ", ", tle->resno,
							 sgc->sortop == tc->gt_opr ? " DESC" : "", sgc->nulls_first ? "FIRST" : "LAST");
			first = false;
		}
		appendStringInfo(&buf, " LIMIT %s", limit_text);
	}
	PG_FINALLY();
	{
		bs_reset_transmission_modes(nest);
	}
	PG_END_TRY();
	return buf.data;
}
