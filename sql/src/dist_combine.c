/*
 * dist_combine.c: aggregates that are not keyed by building, in two phases.
 *
 *   SELECT date_trunc('day', ts) AS d, sum(kwh), avg(kwh) FROM readings GROUP BY 1
 *
 * becomes a combine query over a partial query that the workers answer per fragment:
 *
 *   SELECT g1 AS d, CAST(sum(a1) AS float8), sum(a2) / nullif(sum(a3), 0)
 *     FROM (SELECT date_trunc('day', ts) AS g1, sum(kwh) AS a1, sum(kwh::float8) AS a2,
 *                  count(kwh) AS a3 FROM readings GROUP BY 1) bs_partial
 *    GROUP BY g1
 *
 * Each worker reduces its rows to one row per group; the coordinator combines those few rows.
 * The combine query is written as SQL and parsed by PostgreSQL, so its aggregates, HAVING,
 * ORDER BY and LIMIT are PostgreSQL's own; the subquery "bs_partial" is what the custom scan
 * replaces (dist_planner.c). Combinable: count, sum, min, max, avg, bool_and/or, every,
 * bit_and/or, and DISTINCT aggregates when they all share one argument (the workers then group
 * by it too). Anything else stays with PostgreSQL's plan. The result types are checked against
 * the original query; a mismatch means the rewrite is not used.
 */
#include "buildsmart.h"

#include "access/table.h"
#include "catalog/pg_aggregate.h"
#include "catalog/pg_type.h"
#include "nodes/makefuncs.h"
#include "nodes/nodeFuncs.h"
#include "optimizer/optimizer.h"
#include "parser/analyze.h"
#include "parser/parse_oper.h"
#include "parser/parser.h"
#include "parser/parsetree.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/ruleutils.h"

#define BS_GROUP_PARAM 900000
#define BS_AGG_PARAM 910000

typedef struct BsCombineBuild
{
	Query	   *q;
	Index		dist_rti;
	List	   *groups;			/* grouping expressions (flattened) */
	List	   *aggs;			/* distinct Aggrefs */
	Node	   *distinct_arg;	/* the one argument of all DISTINCT aggregates */
	const char *reason;
} BsCombineBuild;

static Node *
bs_flatten_groups(Node *node, Query *q)
{
	if (node == NULL)
		return NULL;
	if (IsA(node, Var) && q->hasGroupRTE)
	{
		Var		   *v = (Var *) node;

		if (v->varlevelsup == 0 && v->varno > 0 && v->varno <= list_length(q->rtable))
		{
			RangeTblEntry *rte = rt_fetch(v->varno, q->rtable);

			if (rte->rtekind == RTE_GROUP)
				return copyObject(list_nth(rte->groupexprs, v->varattno - 1));
		}
	}
	return expression_tree_mutator(node, bs_flatten_groups, q);
}

static bool
bs_collect_aggs(Node *node, BsCombineBuild *b)
{
	if (node == NULL)
		return false;
	if (IsA(node, Aggref))
	{
		Aggref	   *a = (Aggref *) node;
		ListCell   *lc;

		foreach(lc, b->aggs)
			if (equal(lfirst(lc), a))
				return false;
		b->aggs = lappend(b->aggs, a);
		return false;			/* no nested aggregates in valid SQL */
	}
	return expression_tree_walker(node, bs_collect_aggs, b);
}

/* Replace grouping expressions and aggregates by placeholder parameters (top-down). */
static Node *
bs_placeholders(Node *node, BsCombineBuild *b)
{
	ListCell   *lc;
	int			i = 0;

	if (node == NULL)
		return NULL;
	foreach(lc, b->groups)
	{
		i++;
		if (equal(lfirst(lc), node))
		{
			Param	   *p = makeNode(Param);

			p->paramkind = PARAM_EXTERN;
			p->paramid = BS_GROUP_PARAM + i;
			p->paramtype = exprType(node);
			p->paramtypmod = exprTypmod(node);
			p->paramcollid = exprCollation(node);
			p->location = -1;
			return (Node *) p;
		}
	}
	if (IsA(node, Aggref))
	{
		i = 0;
		foreach(lc, b->aggs)
		{
			i++;
			if (equal(lfirst(lc), node))
			{
				Param	   *p = makeNode(Param);

				p->paramkind = PARAM_EXTERN;
				p->paramid = BS_AGG_PARAM + i;
				p->paramtype = exprType(node);
				p->paramtypmod = exprTypmod(node);
				p->paramcollid = exprCollation(node);
				p->location = -1;
				return (Node *) p;
			}
		}
	}
	return expression_tree_mutator(node, bs_placeholders, b);
}

static bool
bs_has_dist_var(Node *node, void *ctx)
{
	if (node == NULL)
		return false;
	if (IsA(node, Var) && ((Var *) node)->varlevelsup == 0)
		return true;
	return expression_tree_walker(node, bs_has_dist_var, ctx);
}

/* Substitute "$<placeholder>" tokens of a deparsed expression. */
static char *
bs_substitute(const char *text, List *group_texts, List *agg_texts)
{
	StringInfoData out;
	const char *p = text;

	initStringInfo(&out);
	while (*p)
	{
		if (*p == '$' && isdigit((unsigned char) p[1]))
		{
			const char *q = p + 1;
			long		n = 0;

			while (isdigit((unsigned char) *q))
				n = n * 10 + (*q++ - '0');
			if (n > BS_GROUP_PARAM && n <= BS_GROUP_PARAM + list_length(group_texts))
			{
				appendStringInfo(&out, "(%s)", (char *) list_nth(group_texts, n - BS_GROUP_PARAM - 1));
				p = q;
				continue;
			}
			if (n > BS_AGG_PARAM && n <= BS_AGG_PARAM + list_length(agg_texts))
			{
				appendStringInfo(&out, "(%s)", (char *) list_nth(agg_texts, n - BS_AGG_PARAM - 1));
				p = q;
				continue;
			}
		}
		/* string literals cannot contain a placeholder that came from a Param: copy as is */
		appendStringInfoChar(&out, *p++);
	}
	return out.data;
}

static bool
bs_is_numeric_family(Oid t)
{
	return t == INT2OID || t == INT4OID || t == INT8OID || t == NUMERICOID;
}

/*
 * The partial column(s) of one aggregate and how the combine query finishes it. Returns false
 * when the aggregate cannot be split.
 */
static bool
bs_split_agg(Aggref *a, int j, List *ctx, BsCombineBuild *b, List **partials, char **combine)
{
	char	   *name = get_func_name(a->aggfnoid);
	Node	   *arg = a->args ? (Node *) ((TargetEntry *) linitial(a->args))->expr : NULL;
	Oid			argtype = arg ? exprType(arg) : InvalidOid;
	char	   *filter = a->aggfilter ? deparse_expression((Node *) a->aggfilter, ctx, true, false) : NULL;
	char	   *type = format_type_with_typemod(a->aggtype, -1);

	if (a->aggfnoid >= FirstNormalObjectId || a->aggorder != NIL || a->aggkind != AGGKIND_NORMAL ||
		a->aggdirectargs != NIL || list_length(a->args) > 1 || a->aggvariadic)
		return false;
	if (a->aggdistinct != NIL)
	{
		if (arg == NULL || a->aggfilter != NULL)
			return false;
		if (exprType(arg) == RECORDOID || get_typtype(exprType(arg)) == TYPTYPE_PSEUDO)
			return false;		/* the partial rows would carry an anonymous record */
		if (b->distinct_arg == NULL)
			b->distinct_arg = arg;
		else if (!equal(b->distinct_arg, arg))
			return false;
		if (strcmp(name, "count") == 0 || strcmp(name, "sum") == 0 || strcmp(name, "min") == 0 ||
			strcmp(name, "max") == 0 || strcmp(name, "avg") == 0)
		{
			*combine = psprintf("CAST(%s(DISTINCT bs_partial.dx) AS %s)", quote_identifier(name), type);
			return true;
		}
		return false;
	}
	if (strcmp(name, "count") == 0)
	{
		*partials = lappend(*partials, deparse_expression((Node *) a, ctx, true, false));
		*combine = psprintf("CAST(coalesce(sum(bs_partial.a%d_0), 0) AS bigint)", j);
		return true;
	}
	if (strcmp(name, "sum") == 0 || strcmp(name, "min") == 0 || strcmp(name, "max") == 0 ||
		strcmp(name, "bool_and") == 0 || strcmp(name, "bool_or") == 0 || strcmp(name, "every") == 0 ||
		strcmp(name, "bit_and") == 0 || strcmp(name, "bit_or") == 0)
	{
		const char *fn = strcmp(name, "every") == 0 ? "bool_and" : name;

		*partials = lappend(*partials, deparse_expression((Node *) a, ctx, true, false));
		*combine = psprintf("CAST(%s(bs_partial.a%d_0) AS %s)", fn, j, type);
		return true;
	}
	if (strcmp(name, "avg") == 0 && arg != NULL)
	{
		char	   *argtext = deparse_expression(arg, ctx, true, false);
		char	   *f = filter ? psprintf(" FILTER (WHERE %s)", filter) : "";

		if (argtype == FLOAT8OID || argtype == FLOAT4OID)
		{
			*partials = lappend(*partials, psprintf("sum(CAST(%s AS double precision))%s", argtext, f));
			*partials = lappend(*partials, psprintf("count(%s)%s", argtext, f));
			*combine = psprintf("CAST(sum(bs_partial.a%d_0) / CAST(nullif(sum(bs_partial.a%d_1), 0) AS double precision) AS %s)",
								j, j, type);
			return true;
		}
		if (bs_is_numeric_family(argtype))
		{
			*partials = lappend(*partials, psprintf("sum(%s)%s", argtext, f));
			*partials = lappend(*partials, psprintf("count(%s)%s", argtext, f));
			*combine = psprintf("CAST(CAST(sum(bs_partial.a%d_0) AS numeric) / CAST(nullif(sum(bs_partial.a%d_1), 0) AS numeric) AS %s)",
								j, j, type);
			return true;
		}
	}
	return false;
}

static const char *
bs_order_direction(SortGroupClause *sgc, Oid type)
{
	Oid			lt,
				gt;
	bool		hashable;

	get_sort_group_operators(type, false, false, false, &lt, NULL, &gt, &hashable);
	if (sgc->sortop == lt)
		return sgc->nulls_first ? "ASC NULLS FIRST" : "ASC NULLS LAST";
	if (sgc->sortop == gt)
		return sgc->nulls_first ? "DESC NULLS FIRST" : "DESC NULLS LAST";
	return NULL;
}

static bool
bs_max_param(Node *node, int *max)
{
	if (node == NULL)
		return false;
	if (IsA(node, Param) && ((Param *) node)->paramkind == PARAM_EXTERN && ((Param *) node)->paramid > *max)
		*max = ((Param *) node)->paramid;
	return expression_tree_walker(node, bs_max_param, max);
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

BsCombine *
bs_build_combine(Query *parse, Oid dist, Index dist_rti, Index group_rti, const char **reason)
{
	BsCombineBuild b;
	Query	   *q = copyObject(parse);
	List	   *ctx;
	ListCell   *lc;
	List	   *group_texts = NIL;	/* bs_partial.gN, as the combine query refers to them */
	List	   *agg_texts = NIL;	/* combine expression of each aggregate */
	StringInfoData sql;
	StringInfoData partial;
	int			i;
	int			nest;
	int			maxparam = 0;
	Oid		   *ptypes;
	List	   *raw;
	Query	   *combined;
	BsCombine  *out;
	bool		first;

	memset(&b, 0, sizeof(b));
	b.q = q;
	b.dist_rti = dist_rti;
	if (list_length(q->rtable) != (group_rti ? 2 : 1) || dist_rti != 1)
	{
		*reason = "unexpected range table";
		return NULL;
	}
	q->targetList = (List *) bs_flatten_groups((Node *) q->targetList, q);
	q->havingQual = bs_flatten_groups(q->havingQual, q);
	foreach(lc, q->groupClause)
	{
		TargetEntry *tle = get_sortgroupclause_tle(lfirst(lc), q->targetList);

		b.groups = lappend(b.groups, tle->expr);
	}
	(void) bs_collect_aggs((Node *) q->targetList, &b);
	(void) bs_collect_aggs(q->havingQual, &b);

	bs_set_transmission_modes(&nest);
	PG_TRY();
	{
		ctx = deparse_context_for("readings", dist);
		initStringInfo(&partial);
		appendStringInfoString(&partial, "SELECT ");
		first = true;
		i = 0;
		foreach(lc, b.groups)
		{
			i++;
			appendStringInfo(&partial, "%s%s AS g%d", first ? "" : ", ",
							 deparse_expression(lfirst(lc), ctx, true, false), i);
			group_texts = lappend(group_texts, psprintf("bs_partial.g%d", i));
			first = false;
		}
		i = 0;
		foreach(lc, b.aggs)
		{
			List	   *parts = NIL;
			char	   *combine = NULL;
			ListCell   *lp;
			int			k = 0;

			i++;
			if (!bs_split_agg(lfirst(lc), i, ctx, &b, &parts, &combine))
			{
				b.reason = "an aggregate that cannot be combined from partial results";
				break;
			}
			foreach(lp, parts)
			{
				appendStringInfo(&partial, "%s%s AS a%d_%d", first ? "" : ", ", (char *) lfirst(lp), i, k++);
				first = false;
			}
			agg_texts = lappend(agg_texts, combine);
		}
		if (b.reason == NULL && b.distinct_arg != NULL)
		{
			appendStringInfo(&partial, "%s%s AS dx", first ? "" : ", ",
							 deparse_expression(b.distinct_arg, ctx, true, false));
			first = false;
		}
		if (first)
			appendStringInfoString(&partial, "1 AS bs_one");
		appendStringInfo(&partial, " FROM %s readings",
						 quote_qualified_identifier(get_namespace_name(get_rel_namespace(dist)), get_rel_name(dist)));
		if (q->jointree->quals)
			appendStringInfo(&partial, " WHERE %s", deparse_expression(q->jointree->quals, ctx, true, false));
		if (b.groups != NIL || b.distinct_arg != NULL)
		{
			int			n = list_length(b.groups) + (b.distinct_arg ? 1 : 0);

			appendStringInfoString(&partial, " GROUP BY ");
			for (i = 1; i <= list_length(b.groups); i++)
				appendStringInfo(&partial, "%sg%d", i > 1 ? ", " : "", i);
			if (b.distinct_arg)
				appendStringInfo(&partial, "%sdx", n > 1 ? ", " : "");
		}

		initStringInfo(&sql);
		appendStringInfoString(&sql, "SELECT ");
		first = true;
		foreach(lc, q->targetList)
		{
			TargetEntry *tle = lfirst(lc);
			Node	   *e;

			if (tle->resjunk || b.reason)
				continue;
			e = bs_placeholders((Node *) tle->expr, &b);
			if (bs_has_dist_var(e, NULL))
			{
				b.reason = "an output column that is neither grouped nor aggregated";
				break;
			}
			appendStringInfo(&sql, "%s%s AS %s", first ? "" : ", ",
							 bs_substitute(deparse_expression(e, ctx, true, false), group_texts, agg_texts),
							 quote_identifier(tle->resname ? tle->resname : "?column?"));
			first = false;
		}
		appendStringInfo(&sql, " FROM (%s) bs_partial", partial.data);
		if (b.groups != NIL)
		{
			appendStringInfoString(&sql, " GROUP BY ");
			for (i = 1; i <= list_length(b.groups); i++)
				appendStringInfo(&sql, "%sbs_partial.g%d", i > 1 ? ", " : "", i);
		}
		if (q->havingQual && !b.reason)
		{
			Node	   *e = bs_placeholders(q->havingQual, &b);

			if (bs_has_dist_var(e, NULL))
				b.reason = "a HAVING clause over ungrouped columns";
			else
				appendStringInfo(&sql, " HAVING %s",
								 bs_substitute(deparse_expression(e, ctx, true, false), group_texts, agg_texts));
		}
		first = true;
		foreach(lc, q->sortClause)
		{
			SortGroupClause *sgc = lfirst(lc);
			TargetEntry *tle = get_sortgroupclause_tle(sgc, q->targetList);
			Node	   *e;
			const char *dir;

			if (b.reason)
				break;
			e = bs_placeholders((Node *) tle->expr, &b);
			dir = bs_order_direction(sgc, exprType((Node *) tle->expr));
			if (dir == NULL || bs_has_dist_var(e, NULL))
			{
				b.reason = "an ORDER BY this planner cannot repeat";
				break;
			}
			appendStringInfo(&sql, "%s%s %s", first ? " ORDER BY " : ", ",
							 bs_substitute(deparse_expression(e, ctx, true, false), group_texts, agg_texts), dir);
			first = false;
		}
		if (q->limitCount && !b.reason)
			appendStringInfo(&sql, " LIMIT %s", deparse_expression(q->limitCount, ctx, true, false));
		if (q->limitOffset && !b.reason)
			appendStringInfo(&sql, " OFFSET %s", deparse_expression(q->limitOffset, ctx, true, false));

		combined = NULL;
		if (b.reason == NULL)
		{
			(void) query_tree_walker(parse, bs_max_param, &maxparam, 0);
			ptypes = palloc0(sizeof(Oid) * Max(maxparam, 1));
			(void) query_tree_walker(parse, bs_param_types_walker, ptypes, 0);
			for (i = 0; i < maxparam; i++)
				if (!OidIsValid(ptypes[i]))
					ptypes[i] = UNKNOWNOID;
			raw = raw_parser(sql.data, RAW_PARSE_DEFAULT);
			if (list_length(raw) == 1)
				combined = parse_analyze_fixedparams(linitial_node(RawStmt, raw), sql.data, ptypes, maxparam, NULL);
		}
	}
	PG_FINALLY();
	{
		bs_reset_transmission_modes(nest);
	}
	PG_END_TRY();

	if (b.reason != NULL || combined == NULL)
	{
		*reason = b.reason ? b.reason : "the combine query did not parse";
		return NULL;
	}
	/* the rewrite must give exactly the columns the query gives */
	{
		ListCell   *lo = list_head(combined->targetList);

		foreach(lc, parse->targetList)
		{
			TargetEntry *t = lfirst(lc);
			TargetEntry *c;

			if (t->resjunk)
				continue;
			if (lo == NULL)
			{
				*reason = "the combine query has fewer columns";
				return NULL;
			}
			c = lfirst(lo);
			lo = lnext(combined->targetList, lo);
			if (exprType((Node *) t->expr) != exprType((Node *) c->expr))
			{
				*reason = "the combine query would change a column type";
				return NULL;
			}
		}
	}
	combined->canSetTag = parse->canSetTag;
	combined->queryId = parse->queryId;
	out = palloc0(sizeof(BsCombine));
	out->query = combined;
	out->sql = sql.data;
	return out;
}
