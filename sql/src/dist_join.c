/*
 * dist_join.c: a join with buildings, filtered on buildings, reads only the fragments of the
 * buildings that pass the filter.
 *
 *   SELECT b.code, sum(r.kwh) / b.floor_area_m2 FROM readings r JOIN buildings b ON b.code = r.building
 *    WHERE b.floor_area_m2 > 10000 GROUP BY b.code, b.floor_area_m2
 *
 * PostgreSQL joins first and cannot prune readings' fragments from a condition on buildings, so
 * every fragment is read. For an inner join on readings.building = buildings.code with conditions
 * that use only buildings, this adds to the query
 *
 *   AND r.building = ANY (ARRAY(SELECT code FROM buildings WHERE <those conditions>))
 *
 * which changes no answer (a reading whose building fails the conditions has no partner in the
 * join) and is an uncommitted-safe, uncorrelated sub-select: PostgreSQL runs it once as an
 * InitPlan and prunes the fragment partitions at run time with its result (EXPLAIN ANALYZE shows
 * the pruned ones as never executed).
 */
#include "buildsmart.h"

#include "catalog/namespace.h"
#include "catalog/pg_collation.h"
#include "catalog/pg_operator.h"
#include "catalog/pg_type.h"
#include "nodes/makefuncs.h"
#include "nodes/nodeFuncs.h"
#include "optimizer/clauses.h"
#include "optimizer/optimizer.h"
#include "parser/analyze.h"
#include "parser/parser.h"
#include "parser/parsetree.h"
#include "rewrite/rewriteManip.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/ruleutils.h"

typedef struct BsJoinScan
{
	Index		r_rti;
	Index		b_rti;
	AttrNumber	a_building;
	AttrNumber	a_code;
	bool		joined;			/* r.building = b.code seen */
	List	   *b_quals;		/* conjuncts on buildings only */
} BsJoinScan;

static Node *
bs_strip_relabel(Node *n)
{
	while (n && IsA(n, RelabelType))
		n = (Node *) ((RelabelType *) n)->arg;
	return n;
}

static bool
bs_is_var(Node *n, Index rti, AttrNumber attno)
{
	n = bs_strip_relabel(n);
	return n && IsA(n, Var) && ((Var *) n)->varno == (int) rti && ((Var *) n)->varattno == attno &&
		((Var *) n)->varlevelsup == 0;
}

static void
bs_scan_conjuncts(Node *quals, BsJoinScan *j)
{
	ListCell   *lc;

	foreach(lc, make_ands_implicit((Expr *) quals))
	{
		Node	   *c = lfirst(lc);
		Relids		rels = pull_varnos(NULL, c);

		if (IsA(c, OpExpr) && ((OpExpr *) c)->opno == TextEqualOperator && list_length(((OpExpr *) c)->args) == 2)
		{
			Node	   *l = linitial(((OpExpr *) c)->args);
			Node	   *r = lsecond(((OpExpr *) c)->args);

			if ((bs_is_var(l, j->r_rti, j->a_building) && bs_is_var(r, j->b_rti, j->a_code)) ||
				(bs_is_var(r, j->r_rti, j->a_building) && bs_is_var(l, j->b_rti, j->a_code)))
			{
				j->joined = true;
				continue;
			}
		}
		if (bms_membership(rels) == BMS_SINGLETON && bms_is_member(j->b_rti, rels) &&
			!contain_volatile_functions(c) && !contain_subplans(c) && !contain_agg_clause(c) &&
			!contain_window_function(c) && !contain_vars_of_level(c, 1))
			j->b_quals = lappend(j->b_quals, c);
	}
}

/* Conjuncts of WHERE and of inner joins: they hold for every output row. */
static void
bs_walk_jointree(Node *node, BsJoinScan *j)
{
	if (node == NULL)
		return;
	if (IsA(node, FromExpr))
	{
		ListCell   *lc;

		foreach(lc, ((FromExpr *) node)->fromlist)
			bs_walk_jointree(lfirst(lc), j);
		bs_scan_conjuncts(((FromExpr *) node)->quals, j);
	}
	else if (IsA(node, JoinExpr) && ((JoinExpr *) node)->jointype == JOIN_INNER)
	{
		bs_walk_jointree(((JoinExpr *) node)->larg, j);
		bs_walk_jointree(((JoinExpr *) node)->rarg, j);
		bs_scan_conjuncts(((JoinExpr *) node)->quals, j);
	}
}

static bool
bs_param_types_walker(Node *node, Oid *types)
{
	if (node == NULL)
		return false;
	if (IsA(node, Param) && ((Param *) node)->paramkind == PARAM_EXTERN)
		types[((Param *) node)->paramid - 1] = ((Param *) node)->paramtype;
	return expression_tree_walker(node, bs_param_types_walker, types);
}

static bool
bs_max_param_walker(Node *node, int *max)
{
	if (node == NULL)
		return false;
	if (IsA(node, Param) && ((Param *) node)->paramkind == PARAM_EXTERN && ((Param *) node)->paramid > *max)
		*max = ((Param *) node)->paramid;
	return expression_tree_walker(node, bs_max_param_walker, max);
}

/* Adds the pruning condition when the query has the shape above; true when it did. */
bool
bs_add_join_pruning(Query *parse, Oid dist)
{
	Oid			nsp = get_namespace_oid("public", true);
	Oid			buildings = OidIsValid(nsp) ? get_relname_relid("buildings", nsp) : InvalidOid;
	BsJoinScan	j;
	Index		rti = 0;
	ListCell   *lc;
	StringInfoData sql;
	List	   *ctx;
	int			nest;
	int			maxparam = 0;
	Oid		   *ptypes;
	List	   *raw;
	Query	   *arrq;
	Node	   *array;
	ScalarArrayOpExpr *saop;
	bool		first = true;

	if (!OidIsValid(buildings) || parse->commandType != CMD_SELECT)
		return false;
	memset(&j, 0, sizeof(j));
	foreach(lc, parse->rtable)
	{
		RangeTblEntry *rte = lfirst(lc);

		rti++;
		if (rte->rtekind != RTE_RELATION)
			continue;
		if (rte->relid == dist && j.r_rti == 0)
			j.r_rti = rti;
		else if (rte->relid == buildings && j.b_rti == 0)
			j.b_rti = rti;
	}
	if (j.r_rti == 0 || j.b_rti == 0)
		return false;
	j.a_building = get_attnum(dist, "building");
	j.a_code = get_attnum(buildings, "code");
	if (j.a_building == InvalidAttrNumber || j.a_code == InvalidAttrNumber)
		return false;
	bs_walk_jointree((Node *) parse->jointree, &j);
	if (!j.joined || j.b_quals == NIL)
		return false;

	bs_set_transmission_modes(&nest);
	PG_TRY();
	{
		ctx = deparse_context_for("b", buildings);
		initStringInfo(&sql);
		appendStringInfo(&sql, "SELECT ARRAY(SELECT b.code FROM %s b WHERE ",
						 quote_qualified_identifier("public", "buildings"));
		foreach(lc, j.b_quals)
		{
			Node	   *c = copyObject(lfirst(lc));

			ChangeVarNodes(c, j.b_rti, 1, 0);
			appendStringInfo(&sql, "%s(%s)", first ? "" : " AND ", deparse_expression(c, ctx, true, false));
			first = false;
		}
		appendStringInfoString(&sql, ")");
		(void) query_tree_walker(parse, bs_max_param_walker, &maxparam, 0);
		ptypes = palloc0(sizeof(Oid) * Max(maxparam, 1));
		(void) query_tree_walker(parse, bs_param_types_walker, ptypes, 0);
		for (int i = 0; i < maxparam; i++)
			if (!OidIsValid(ptypes[i]))
				ptypes[i] = UNKNOWNOID;
		raw = raw_parser(sql.data, RAW_PARSE_DEFAULT);
		arrq = parse_analyze_fixedparams(linitial_node(RawStmt, raw), sql.data, ptypes, maxparam, NULL);
	}
	PG_FINALLY();
	{
		bs_reset_transmission_modes(nest);
	}
	PG_END_TRY();

	array = (Node *) ((TargetEntry *) linitial(arrq->targetList))->expr;
	if (!IsA(array, SubLink) || exprType(array) != TEXTARRAYOID)
		return false;
	saop = makeNode(ScalarArrayOpExpr);
	saop->opno = TextEqualOperator;
	saop->useOr = true;
	saop->inputcollid = C_COLLATION_OID;
	saop->args = list_make2(makeVar(j.r_rti, j.a_building, TEXTOID, -1, C_COLLATION_OID, 0), array);
	saop->location = -1;
	set_sa_opfuncid(saop);
	parse->jointree->quals = (Node *) make_and_qual(parse->jointree->quals, (Node *) saop);
	parse->hasSubLinks = true;
	if (bs_log_pushdown)
		elog(LOG, "buildsmart: join pruning added: %s", sql.data);
	return true;
}
