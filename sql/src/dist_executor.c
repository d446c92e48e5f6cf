/*
 * dist_executor.c: the custom scan that runs a distributed SELECT.
 *
 * Begin: evaluate the parameters on the coordinator (once), prune fragments on building, group
 * the remaining fragments by node and send one statement to every node at once (fragments of one
 * node as UNION ALL), so all workers compute concurrently. Exec: read the results node by node;
 * when the query has ORDER BY and several fragments answered, merge them with a tuplesort bounded
 * by LIMIT; apply OFFSET and LIMIT. End: cancel what is still running (LIMIT reached early).
 *
 * Fallback: when the executor may not use its own worker connections (this transaction already
 * wrote through postgres_fdw, whose uncommitted rows only its connections see) or the parameters
 * do not allow it, the original query is planned by PostgreSQL and run inside this node.
 *
 * Also here: the executor hook that notices writes to the distributed table through postgres_fdw.
 */
#include "buildsmart.h"

#include "access/relation.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_class.h"
#include "catalog/pg_collation.h"
#include "catalog/pg_type.h"
#include "commands/copy.h"
#include "commands/explain.h"
#include "commands/explain_format.h"
#include "executor/executor.h"
#include "executor/tstoreReceiver.h"
#include "foreign/foreign.h"
#include "libpq/pqformat.h"
#include "miscadmin.h"
#include "nodes/makefuncs.h"
#include "nodes/nodeFuncs.h"
#include "optimizer/planner.h"
#include "parser/parsetree.h"
#include "tcop/utility.h"
#include "utils/array.h"
#include "utils/builtins.h"
#include "utils/datum.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/snapmgr.h"
#include "utils/sortsupport.h"
#include "utils/tuplesort.h"

bool		bs_xact_wrote_through_fdw = false;
int			bs_exec_depth = 0;		/* executors running in this backend (1 = top level) */

static ExecutorStart_hook_type prev_executor_start = NULL;
static ExecutorEnd_hook_type prev_executor_end = NULL;
static ProcessUtility_hook_type prev_process_utility = NULL;

typedef struct BsRun
{
	BsConn	   *conn;
	Oid			server;			/* foreign server */
	char	   *node;			/* foreign server name */
	char	   *sql;			/* the statement sent */
	List	   *fragments;		/* names, for EXPLAIN */
	List	   *frag_idx;		/* their positions in frag_oids / frag_sql */
	PGresult   *res;			/* current result */
	int			row;			/* next row of res */
	bool		done;			/* all results read */
	int64		rows;			/* rows received (EXPLAIN ANALYZE) */
	instr_time	sent;
	double		ms;				/* time to the first result (EXPLAIN ANALYZE) */
	bool		in_order;		/* the whole result comes in the query's ORDER BY */
} BsRun;

typedef struct BsScanState
{
	CustomScanState css;

	/* from the plan */
	Query	   *query;
	List	   *frag_oids;
	List	   *frag_sql;
	List	   *frag_lower;
	List	   *frag_upper;
	List	   *frag_ts_lower;
	List	   *frag_ts_upper;
	int			redistinct;		/* leading sort keys that must be distinct (time pieces) */
	int			shape;
	int			nparams;
	int			nprune;
	bool		has_limit;
	int			limit_param;
	bool		binary;
	bool		leaf;
	bool		insert;
	bool		merge;			/* BS_INT_MERGE */
	int64		processed;		/* rows inserted (INSERT) */
	bool		counted;		/* ... and added to es_processed */
	int			cursor_options;
	List	   *prune_kinds;
	char	   *note;
	int			nsort;
	AttrNumber *sort_attno;
	Oid		   *sort_op;
	Oid		   *sort_coll;
	bool	   *sort_nf;
	List	   *param_states;
	List	   *prune_states;
	List	   *prune_exprs;	/* the expressions of prune_states (EXPLAIN) */
	ExprState  *limit_count_state;
	ExprState  *limit_offset_state;

	/* decided in Begin */
	bool		explain_only;
	bool		started;
	const char *fallback;		/* reason, when running PostgreSQL's own plan */
	QueryDesc  *fb;				/* that plan, whole query */
	PlanState  *fb_child;		/* that plan, partial query (leaf) */
	int			nfrags_total;
	int			nfrags_used;
	int			nruns;
	BsRun	   *runs;
	int			cur;
	int64		offset;
	int64		count;			/* -1: no LIMIT */
	int64		returned;
	int64		skipped;

	/* conversion of worker values */
	FmgrInfo   *in_funcs;
	Oid		   *in_ioparams;
	int32	   *typmods;

	/* merge */
	MemoryContext key_cxt;
	Datum	   *last_key;
	bool	   *last_null;
	bool		have_last_key;
	TupleTableSlot *sort_slot;
	Tuplesortstate *sort;
	bool		sorted;

	/* merge of ordered results: the current row of each run */
	int			merge_cap;		/* runs the arrays below hold */
	bool		merging;		/* started for this execution */
	int			merge_last;		/* run whose row was returned last, or -1 */
	SortSupport merge_keys;
	TupleTableSlot **merge_slots;
	MemoryContext *merge_cxts;
	bool	   *merge_has;
} BsScanState;

static Node *bs_create_state(CustomScan *cscan);
static void bs_begin(CustomScanState *node, EState *estate, int eflags);
static TupleTableSlot *bs_exec(CustomScanState *node);
static void bs_end(CustomScanState *node);
static void bs_rescan(CustomScanState *node);
static void bs_explain(CustomScanState *node, List *ancestors, ExplainState *es);

static CustomScanMethods bs_scan_methods = {
	.CustomName = "BuildSmart Distributed",
	.CreateCustomScanState = bs_create_state,
};

static CustomExecMethods bs_exec_methods = {
	.CustomName = "BuildSmart Distributed",
	.BeginCustomScan = bs_begin,
	.ExecCustomScan = bs_exec,
	.EndCustomScan = bs_end,
	.ReScanCustomScan = bs_rescan,
	.ExplainCustomScan = bs_explain,
};

static void bs_executor_start(QueryDesc *queryDesc, int eflags);
static void bs_executor_end(QueryDesc *queryDesc);
static void bs_process_utility(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
							   ProcessUtilityContext context, ParamListInfo params,
							   QueryEnvironment *queryEnv, DestReceiver *dest, QueryCompletion *qc);

void
bs_executor_init(void)
{
	RegisterCustomScanMethods(&bs_scan_methods);
	prev_executor_start = ExecutorStart_hook;
	ExecutorStart_hook = bs_executor_start;
	prev_executor_end = ExecutorEnd_hook;
	ExecutorEnd_hook = bs_executor_end;
	prev_process_utility = ProcessUtility_hook;
	ProcessUtility_hook = bs_process_utility;
}

CustomScan *
bs_make_custom_scan(List *tlist, List *custom_exprs, List *custom_private)
{
	CustomScan *cs = makeNode(CustomScan);

	cs->scan.plan.targetlist = tlist;
	cs->scan.plan.qual = NIL;
	cs->scan.plan.startup_cost = 0;
	cs->scan.plan.total_cost = 0;
	cs->scan.plan.plan_rows = 1000;
	cs->scan.plan.plan_width = 32;
	cs->scan.plan.parallel_aware = false;
	cs->scan.plan.parallel_safe = false;
	cs->scan.scanrelid = 0;
	cs->flags = 0;
	cs->custom_plans = NIL;
	cs->custom_exprs = custom_exprs;
	cs->custom_private = custom_private;
	cs->methods = &bs_scan_methods;
	return cs;
}

static Node *
bs_create_state(CustomScan *cscan)
{
	BsScanState *s = (BsScanState *) newNode(sizeof(BsScanState), T_CustomScanState);
	List	   *priv = cscan->custom_private;
	List	   *ints = list_nth(priv, BS_PRIV_INTS);
	List	   *sattno = list_nth(priv, BS_PRIV_SORT_ATTNO);
	int			i;

	s->css.methods = &bs_exec_methods;
	s->query = list_nth(priv, BS_PRIV_QUERY);
	s->frag_oids = list_nth(priv, BS_PRIV_FRAG_OIDS);
	s->frag_sql = list_nth(priv, BS_PRIV_FRAG_SQL);
	s->frag_lower = list_nth(priv, BS_PRIV_FRAG_LOWER);
	s->frag_upper = list_nth(priv, BS_PRIV_FRAG_UPPER);
	s->frag_ts_lower = list_nth(priv, BS_PRIV_FRAG_TS_LOWER);
	s->frag_ts_upper = list_nth(priv, BS_PRIV_FRAG_TS_UPPER);
	s->redistinct = list_nth_int(ints, BS_INT_REDISTINCT);
	s->shape = list_nth_int(ints, BS_INT_SHAPE);
	s->nparams = list_nth_int(ints, BS_INT_NPARAMS);
	s->nprune = list_nth_int(ints, BS_INT_NPRUNE);
	s->has_limit = list_nth_int(ints, BS_INT_HAS_LIMIT);
	s->limit_param = list_nth_int(ints, BS_INT_LIMIT_PARAM);
	s->binary = list_nth_int(ints, BS_INT_BINARY);
	s->cursor_options = list_nth_int(ints, BS_INT_CURSOR_OPTIONS);
	s->leaf = list_nth_int(ints, BS_INT_LEAF);
	s->insert = list_nth_int(ints, BS_INT_INSERT);
	s->merge = list_nth_int(ints, BS_INT_MERGE);
	s->prune_kinds = list_nth(priv, BS_PRIV_PRUNE_KIND);
	s->note = strVal(list_nth(priv, BS_PRIV_NOTE));
	s->nsort = list_length(sattno);
	s->sort_attno = palloc(sizeof(AttrNumber) * Max(s->nsort, 1));
	s->sort_op = palloc(sizeof(Oid) * Max(s->nsort, 1));
	s->sort_coll = palloc(sizeof(Oid) * Max(s->nsort, 1));
	s->sort_nf = palloc(sizeof(bool) * Max(s->nsort, 1));
	for (i = 0; i < s->nsort; i++)
	{
		s->sort_attno[i] = list_nth_int(sattno, i);
		s->sort_op[i] = list_nth_oid(list_nth(priv, BS_PRIV_SORT_OP), i);
		s->sort_coll[i] = list_nth_oid(list_nth(priv, BS_PRIV_SORT_COLL), i);
		s->sort_nf[i] = list_nth_int(list_nth(priv, BS_PRIV_SORT_NULLSFIRST), i);
	}
	return (Node *) s;
}

/* ---------------------------------------------------------------- fallback */

static void
bs_start_fallback(BsScanState *s, EState *estate, int eflags, const char *why)
{
	PlannedStmt *ps;
	bool		save = bs_planning_fallback;

	s->fallback = why;
	if (s->leaf)
	{
		/* the plan PostgreSQL made for the partial query is this node's child */
		CustomScan *cs = (CustomScan *) s->css.ss.ps.plan;

		s->fb_child = ExecInitNode(linitial(cs->custom_plans), estate, eflags);
		s->css.custom_ps = list_make1(s->fb_child);
		return;
	}
	bs_planning_fallback = true;
	PG_TRY();
	{
		ps = standard_planner(copyObject(s->query), NULL, s->cursor_options, estate->es_param_list_info);
	}
	PG_FINALLY();
	{
		bs_planning_fallback = save;
	}
	PG_END_TRY();
	s->fb = CreateQueryDesc(ps, "buildsmart fallback", GetActiveSnapshot(), InvalidSnapshot,
							None_Receiver, estate->es_param_list_info, estate->es_queryEnv,
							(estate->es_instrument ? INSTRUMENT_ALL : 0));
	ExecutorStart(s->fb, eflags);
}

/* ---------------------------------------------------------------- pruning */

static int
bs_cmp_c(Datum a, Datum b)
{
	return DatumGetInt32(DirectFunctionCall2Coll(bttextcmp, C_COLLATION_OID, a, b));
}

static bool
bs_holds(Const *lower, Const *upper, Datum b)
{
	if (!lower->constisnull && bs_cmp_c(b, lower->constvalue) < 0)
		return false;
	if (!upper->constisnull && bs_cmp_c(b, upper->constvalue) >= 0)
		return false;
	return true;
}

/* Which fragments may hold rows, given the pruning values of this execution. */
static bool *
bs_prune(BsScanState *s, ExprContext *econtext)
{
	int			n = list_length(s->frag_oids);
	bool	   *keep = palloc(sizeof(bool) * n);
	ListCell   *ls,
			   *lk;
	int			i;

	for (i = 0; i < n; i++)
		keep[i] = true;
	forboth(ls, s->prune_states, lk, s->prune_kinds)
	{
		bool		isnull;
		Datum		v = ExecEvalExprSwitchContext(lfirst(ls), econtext, &isnull);

		for (i = 0; i < n; i++)
		{
			Const	   *lo = list_nth(s->frag_lower, i);
			Const	   *hi = list_nth(s->frag_upper, i);
			bool		hit = false;

			if (!keep[i])
				continue;
			if (isnull)
				hit = false;
			else if (BS_PRUNE_IS_TS(lfirst_int(lk)))
			{
				Const	   *tlo = list_nth(s->frag_ts_lower, i);
				Const	   *thi = list_nth(s->frag_ts_upper, i);

				hit = bs_time_may_hold(tlo, thi, lfirst_int(lk), DatumGetTimestampTz(v));
			}
			else if (BS_PRUNE_IS_RANGE(lfirst_int(lk)))
				hit = bs_range_may_hold(lo, hi, lfirst_int(lk), v);
			else if (lfirst_int(lk) == BS_PRUNE_EQ)
				hit = bs_holds(lo, hi, v);
			else
			{
				Datum	   *elems;
				bool	   *nulls;
				int			ne,
							j;

				deconstruct_array_builtin(DatumGetArrayTypeP(v), TEXTOID, &elems, &nulls, &ne);
				for (j = 0; j < ne && !hit; j++)
					hit = !nulls[j] && bs_holds(lo, hi, elems[j]);
			}
			keep[i] = hit;
		}
	}
	return keep;
}

/* ---------------------------------------------------------------- dispatch */

static void
bs_param_value(Datum v, bool isnull, Oid type, bool binary, const char **value, int *length, int *format)
{
	if (isnull)
	{
		*value = NULL;
		*length = 0;
		*format = 0;
	}
	else if (binary)
	{
		Oid			send;
		bool		varlena;
		bytea	   *b;

		getTypeBinaryOutputInfo(type, &send, &varlena);
		b = OidSendFunctionCall(send, v);
		*value = VARDATA(b);
		*length = VARSIZE(b) - VARHDRSZ;
		*format = 1;
	}
	else
	{
		Oid			out;
		bool		varlena;

		getTypeOutputInfo(type, &out, &varlena);
		*value = OidOutputFunctionCall(out, v);
		*length = 0;
		*format = 0;
	}
}

/* Does an alias follow a FROM item, rather than the next clause of the statement? */
static bool
bs_alias_follows(const char *after)
{
	static const char *const clauses[] = {"WHERE", "GROUP", "HAVING", "WINDOW", "ORDER", "LIMIT", "OFFSET",
	"FETCH", "FOR", NULL};
	int			len = 0;
	int			k;

	if (*after != ' ')
		return false;
	after++;
	while (after[len] && after[len] != ' ' && after[len] != ')')
		len++;
	for (k = 0; clauses[k]; k++)
		if ((int) strlen(clauses[k]) == len && strncmp(after, clauses[k], len) == 0)
			return false;
	return len > 0;
}

/*
 * One statement for all the fragments a node holds: the first fragment's statement with its table
 * replaced by the UNION ALL of the node's fragment tables, so the worker plans, sorts, aggregates
 * and starts parallel workers once instead of once per fragment. Only for statements that are the
 * query itself (not the skip scans) and fragments that are not time pieces: then every group, key
 * or window of the query lies within one fragment, so reading them together gives the rows the
 * fragments would give one by one (LIMIT included: the coordinator merges and limits again).
 * NULL when the statement does not name its table exactly once.
 */
static char *
bs_merged_statement(BsScanState *s, BsRun *run)
{
	int			first = linitial_int(run->frag_idx);
	Oid			frag = list_nth_oid(s->frag_oids, first);
	const char *sql = strVal(list_nth(s->frag_sql, first));
	char	   *name = get_rel_name(frag);
	char	   *from = psprintf(" FROM %s", quote_qualified_identifier(get_namespace_name(get_rel_namespace(frag)), name));
	const char *hit = strstr(sql, from);
	const char *after;
	StringInfoData cols;
	StringInfoData buf;
	TupleDesc	desc;
	Relation	rel;
	ListCell   *lc;
	int			a;

	if (hit == NULL)
		return NULL;
	after = hit + strlen(from);
	if ((*after != ' ' && *after != ')' && *after != '\0') || strstr(after, from) != NULL)
		return NULL;
	foreach(lc, run->frag_idx)
	{
		int			i = lfirst_int(lc);

		if (!((Const *) list_nth(s->frag_ts_lower, i))->constisnull ||
			!((Const *) list_nth(s->frag_ts_upper, i))->constisnull)
			return NULL;
	}
	/* the columns by name: the worker tables of a node may differ in column order */
	initStringInfo(&cols);
	rel = relation_open(frag, AccessShareLock);
	desc = RelationGetDescr(rel);
	for (a = 0; a < desc->natts; a++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, a);

		if (att->attisdropped)
			continue;
		appendStringInfo(&cols, "%s%s", cols.len > 0 ? ", " : "", quote_identifier(NameStr(att->attname)));
	}
	relation_close(rel, AccessShareLock);
	initStringInfo(&buf);
	appendBinaryStringInfo(&buf, sql, hit - sql);
	appendStringInfoString(&buf, " FROM (");
	foreach(lc, run->frag_idx)
	{
		Oid			f = list_nth_oid(s->frag_oids, lfirst_int(lc));

		appendStringInfo(&buf, "%sSELECT %s FROM %s", foreach_current_index(lc) > 0 ? " UNION ALL " : "", cols.data,
						 quote_qualified_identifier(get_namespace_name(get_rel_namespace(f)), get_rel_name(f)));
	}
	/* the table's own name stays its alias (columns may be qualified by it), unless it has one */
	if (bs_alias_follows(after))
		appendStringInfoChar(&buf, ')');
	else
		appendStringInfo(&buf, ") %s", quote_identifier(name));
	appendStringInfoString(&buf, after);
	return buf.data;
}

/*
 * Which fragments this execution reads, grouped into one statement per worker (no I/O): the
 * building and time pruning values are evaluated here.
 */
static void
bs_assign_runs(BsScanState *s, ExprContext *econtext)
{
	int			nfrag = list_length(s->frag_oids);
	bool	   *keep;
	int			i,
				r;

	keep = bs_prune(s, econtext);
	s->nfrags_total = nfrag;
	s->nfrags_used = 0;
	s->runs = palloc0(sizeof(BsRun) * Max(nfrag, 1));
	s->nruns = 0;
	for (i = 0; i < nfrag; i++)
	{
		Oid			frag = list_nth_oid(s->frag_oids, i);
		Oid			server;
		BsRun	   *run = NULL;
		char	   *sql = strVal(list_nth(s->frag_sql, i));

		if (!keep[i])
			continue;
		s->nfrags_used++;
		server = GetForeignTable(frag)->serverid;
		for (r = 0; r < s->nruns; r++)
			if (s->runs[r].server == server)
				run = &s->runs[r];
		if (run == NULL)
		{
			run = &s->runs[s->nruns++];
			run->server = server;
			run->sql = sql;
			run->node = GetForeignServer(server)->servername;
		}
		else
			run->sql = psprintf("(%s) UNION ALL (%s)", run->sql, sql);
		run->fragments = lappend(run->fragments, get_rel_name(frag));
		run->frag_idx = lappend_int(run->frag_idx, i);
	}
	if (s->shape == BS_SHAPE_SINGLE && s->nfrags_used > 1)
		elog(ERROR, "buildsmart: a single-fragment plan selected %d fragments", s->nfrags_used);

	for (r = 0; r < s->nruns; r++)
	{
		BsRun	   *run = &s->runs[r];
		char	   *merged;

		if (list_length(run->fragments) <= 1)
		{
			run->in_order = true;	/* one fragment's statement ends in the query's ORDER BY */
			continue;
		}
		merged = s->merge ? bs_merged_statement(s, run) : NULL;
		run->in_order = merged != NULL;
		if (merged != NULL)
			run->sql = merged;
		else					/* parenthesised UNION ALL branches need an outer plain SELECT */
			run->sql = psprintf("SELECT * FROM (%s) bs_union", run->sql);
	}
}

static void
bs_dispatch(BsScanState *s, EState *estate)
{
	ExprContext *econtext = s->css.ss.ps.ps_ExprContext;
	int			np = s->nparams + (s->limit_param > 0 ? 1 : 0);
	Oid		   *types = palloc0(sizeof(Oid) * Max(np, 1));
	const char **values = palloc0(sizeof(char *) * Max(np, 1));
	int		   *lengths = palloc0(sizeof(int) * Max(np, 1));
	int		   *formats = palloc0(sizeof(int) * Max(np, 1));
	ListCell   *lc;
	int			i = 0;
	int			r;

	/* parameters: evaluated here, once */
	foreach(lc, s->param_states)
	{
		ExprState  *es = lfirst(lc);
		bool		isnull;
		Datum		v = ExecEvalExprSwitchContext(es, econtext, &isnull);
		Oid			t = exprType((Node *) es->expr);
		bool		builtin = bs_type_is_builtin(t);

		types[i] = builtin ? t : InvalidOid;	/* let the worker infer extension types */
		bs_param_value(v, isnull, t, builtin, &values[i], &lengths[i], &formats[i]);
		i++;
	}

	/* OFFSET and LIMIT, evaluated here; workers return count+offset rows each */
	s->offset = 0;
	s->count = -1;
	if (s->has_limit)
	{
		bool		isnull;
		Datum		v;

		if (s->limit_offset_state)
		{
			v = ExecEvalExprSwitchContext(s->limit_offset_state, econtext, &isnull);
			if (!isnull)
			{
				s->offset = DatumGetInt64(v);
				if (s->offset < 0)
					ereport(ERROR, (errcode(ERRCODE_INVALID_ROW_COUNT_IN_RESULT_OFFSET_CLAUSE),
									errmsg("OFFSET must not be negative")));
			}
		}
		if (s->limit_count_state)
		{
			v = ExecEvalExprSwitchContext(s->limit_count_state, econtext, &isnull);
			if (!isnull)
			{
				s->count = DatumGetInt64(v);
				if (s->count < 0)
					ereport(ERROR, (errcode(ERRCODE_INVALID_ROW_COUNT_IN_LIMIT_CLAUSE),
									errmsg("LIMIT must not be negative")));
			}
		}
		if (s->limit_param > 0)
		{
			char		buf[32];

			types[i] = INT8OID;
			formats[i] = 0;
			if (s->count < 0)
				values[i] = NULL;
			else
			{
				snprintf(buf, sizeof(buf), INT64_FORMAT, s->count + s->offset);
				values[i] = pstrdup(buf);
			}
			i++;
		}
	}

	bs_assign_runs(s, econtext);
	for (r = 0; r < s->nruns; r++)
	{
		BsRun	   *run = &s->runs[r];

		run->conn = bs_get_conn(run->server, NULL);
		INSTR_TIME_SET_CURRENT(run->sent);
		bs_conn_send(run->conn, run->sql, np, types, values, lengths, formats, s->binary ? 1 : 0);
	}
	s->cur = 0;
	s->returned = 0;
	s->skipped = 0;
	s->started = true;
}

/* The next row of one worker's result into the slot; false when that worker is done. */
static bool
bs_next_row(BsScanState *s, BsRun *run, TupleTableSlot *slot)
{
	TupleDesc	desc = slot->tts_tupleDescriptor;
	int			natts = desc->natts;
	int			i;

	for (;;)
	{
		if (run->done)
			return false;
		if (run->res != NULL && run->row < PQntuples(run->res))
			break;
		if (run->res != NULL)
		{
			PQclear(run->res);
			run->res = NULL;
		}
		run->res = bs_conn_get_result(run->conn);
		if (run->ms == 0)
		{
			instr_time	now;

			INSTR_TIME_SET_CURRENT(now);
			INSTR_TIME_SUBTRACT(now, run->sent);
			run->ms = INSTR_TIME_GET_MILLISEC(now);
		}
		if (run->res == NULL)
		{
			run->done = true;
			return false;
		}
		if (PQresultStatus(run->res) == PGRES_COMMAND_OK)
		{
			/* INSERT without RETURNING: count what the worker inserted */
			s->processed += strtoll(PQcmdTuples(run->res), NULL, 10);
			continue;
		}
		if (PQresultStatus(run->res) != PGRES_TUPLES_OK)
		{
			PGresult   *bad = run->res;

			run->res = NULL;
			bs_report_remote_error(ERROR, bad, run->conn, run->sql);
		}
		if (s->insert)
			s->processed += PQntuples(run->res);
		if (PQnfields(run->res) != natts)
			elog(ERROR, "buildsmart: node %s returned %d columns, expected %d", run->node,
				 PQnfields(run->res), natts);
		run->row = 0;
	}

	ExecClearTuple(slot);
	for (i = 0; i < natts; i++)
	{
		if (PQgetisnull(run->res, run->row, i))
		{
			slot->tts_values[i] = (Datum) 0;
			slot->tts_isnull[i] = true;
			continue;
		}
		if (s->binary)
		{
			StringInfoData buf;

			buf.data = PQgetvalue(run->res, run->row, i);
			buf.len = PQgetlength(run->res, run->row, i);
			buf.maxlen = buf.len;
			buf.cursor = 0;
			slot->tts_values[i] = ReceiveFunctionCall(&s->in_funcs[i], &buf, s->in_ioparams[i], s->typmods[i]);
			if (buf.cursor != buf.len)
				elog(ERROR, "buildsmart: bad binary value from node %s", run->node);
		}
		else
			slot->tts_values[i] = InputFunctionCall(&s->in_funcs[i], PQgetvalue(run->res, run->row, i),
													s->in_ioparams[i], s->typmods[i]);
		slot->tts_isnull[i] = false;
	}
	run->row++;
	run->rows++;
	ExecStoreVirtualTuple(slot);
	return true;
}

/* ---------------------------------------------------------------- executor methods */

static void
bs_begin(CustomScanState *node, EState *estate, int eflags)
{
	BsScanState *s = (BsScanState *) node;
	CustomScan *cs = (CustomScan *) node->ss.ps.plan;
	TupleDesc	desc = node->ss.ss_ScanTupleSlot->tts_tupleDescriptor;
	ListCell   *lc;
	int			i = 0;
	bool	   *keep;
	int			nkeep = 0;

	s->explain_only = (eflags & EXEC_FLAG_EXPLAIN_ONLY) != 0;
	s->param_states = NIL;
	s->prune_states = NIL;
	s->prune_exprs = NIL;
	foreach(lc, cs->custom_exprs)
	{
		Expr	   *e = lfirst(lc);
		ExprState  *es = e ? ExecInitExpr(e, &node->ss.ps) : NULL;

		if (i < s->nparams)
			s->param_states = lappend(s->param_states, es);
		else if (i < s->nparams + s->nprune)
		{
			s->prune_states = lappend(s->prune_states, es);
			s->prune_exprs = lappend(s->prune_exprs, e);
		}
		else if (i == s->nparams + s->nprune)
			s->limit_count_state = es;
		else
			s->limit_offset_state = es;
		i++;
	}
	s->in_funcs = palloc0(sizeof(FmgrInfo) * Max(desc->natts, 1));
	s->in_ioparams = palloc0(sizeof(Oid) * Max(desc->natts, 1));
	s->typmods = palloc0(sizeof(int32) * Max(desc->natts, 1));
	for (i = 0; i < desc->natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);
		Oid			fn;

		if (s->binary)
			getTypeBinaryInputInfo(att->atttypid, &fn, &s->in_ioparams[i]);
		else
			getTypeInputInfo(att->atttypid, &fn, &s->in_ioparams[i]);
		fmgr_info(fn, &s->in_funcs[i]);
		s->typmods[i] = att->atttypmod;
	}
	s->sort_slot = ExecAllocTableSlot(&estate->es_tupleTable, desc, &TTSOpsMinimalTuple);

	/* may this execution use the worker connections? */
	if (s->insert && !s->explain_only && (bs_exec_depth != 1 || IsTransactionBlock()))
	{
		bs_start_fallback(s, estate, eflags,
						  "inside a transaction block or a function: postgres_fdw keeps the write atomic with it");
		return;
	}
	if (!bs_enable_pushdown)
	{
		bs_start_fallback(s, estate, eflags, "buildsmart.enable_pushdown is off");
		return;
	}
	if (bs_xact_wrote_through_fdw)
	{
		bs_start_fallback(s, estate, eflags,
						  "this transaction wrote to readings through postgres_fdw");
		return;
	}
	if (s->shape == BS_SHAPE_SINGLE && !s->explain_only)
	{
		keep = bs_prune(s, node->ss.ps.ps_ExprContext);
		for (i = 0; i < list_length(s->frag_oids); i++)
			nkeep += keep[i] ? 1 : 0;
		if (nkeep != 1)
		{
			bs_start_fallback(s, estate, eflags, s->insert ? "the rows belong to several fragments"
							  : "the parameters select several fragments");
			return;
		}
	}
	/*
	 * Sent on the first call for rows: a value the statement needs may come from an InitPlan of a
	 * node above, which is only ready once the whole plan is initialised.
	 */
}

/* Does this row repeat the DISTINCT ON key of the last row returned? Remembers it if not. */
static bool
bs_same_distinct_key(BsScanState *s, TupleTableSlot *slot)
{
	TupleDesc	desc = slot->tts_tupleDescriptor;
	int			k;
	bool		same = s->have_last_key;

	slot_getallattrs(slot);
	for (k = 0; same && k < s->redistinct; k++)
	{
		int			a = s->sort_attno[k] - 1;
		Form_pg_attribute att = TupleDescAttr(desc, a);

		if (slot->tts_isnull[a] != s->last_null[k])
			same = false;
		else if (!slot->tts_isnull[a] &&
				 !datum_image_eq(slot->tts_values[a], s->last_key[k], att->attbyval, att->attlen))
			same = false;
	}
	if (same)
		return true;
	if (s->key_cxt == NULL)
	{
		s->key_cxt = AllocSetContextCreate(CurrentMemoryContext, "buildsmart distinct key", ALLOCSET_SMALL_SIZES);
		s->last_key = palloc0(sizeof(Datum) * s->redistinct);
		s->last_null = palloc0(sizeof(bool) * s->redistinct);
	}
	MemoryContextReset(s->key_cxt);
	for (k = 0; k < s->redistinct; k++)
	{
		int			a = s->sort_attno[k] - 1;
		Form_pg_attribute att = TupleDescAttr(desc, a);
		MemoryContext old = MemoryContextSwitchTo(s->key_cxt);

		s->last_null[k] = slot->tts_isnull[a];
		s->last_key[k] = slot->tts_isnull[a] ? (Datum) 0 : datumCopy(slot->tts_values[a], att->attbyval, att->attlen);
		MemoryContextSwitchTo(old);
	}
	s->have_last_key = true;
	return false;
}

/* The next row of run r into its merge slot, in that run's own memory. */
static bool
bs_merge_advance(BsScanState *s, int r)
{
	MemoryContext old;
	bool		got;

	MemoryContextReset(s->merge_cxts[r]);
	old = MemoryContextSwitchTo(s->merge_cxts[r]);
	got = bs_next_row(s, &s->runs[r], s->merge_slots[r]);
	MemoryContextSwitchTo(old);
	return got;
}

static int
bs_merge_cmp(BsScanState *s, TupleTableSlot *a, TupleTableSlot *b)
{
	int			k;

	for (k = 0; k < s->nsort; k++)
	{
		bool		na,
					nb;
		Datum		da = slot_getattr(a, s->sort_attno[k], &na);
		Datum		db = slot_getattr(b, s->sort_attno[k], &nb);
		int			c = ApplySortComparator(da, na, db, nb, &s->merge_keys[k]);

		if (c != 0)
			return c;
	}
	return 0;
}

/*
 * Merge of results that each arrive in the query's ORDER BY (every run's statement sorts the
 * whole of its result): the smallest current row of the runs, a few comparisons per row instead
 * of sorting everything again on the coordinator.
 */
static TupleTableSlot *
bs_merge_next(BsScanState *s)
{
	int			best = -1;
	int			r;

	if (!s->merging)
	{
		if (s->merge_cap < s->nruns)
		{
			EState	   *estate = s->css.ss.ps.state;
			TupleDesc	desc = s->css.ss.ss_ScanTupleSlot->tts_tupleDescriptor;
			MemoryContext old = MemoryContextSwitchTo(estate->es_query_cxt);
			int			k;

			s->merge_keys = palloc0(sizeof(SortSupportData) * s->nsort);
			for (k = 0; k < s->nsort; k++)
			{
				SortSupport ss = &s->merge_keys[k];

				ss->ssup_cxt = estate->es_query_cxt;
				ss->ssup_collation = s->sort_coll[k];
				ss->ssup_nulls_first = s->sort_nf[k];
				ss->ssup_attno = s->sort_attno[k];
				PrepareSortSupportFromOrderingOp(s->sort_op[k], ss);
			}
			s->merge_slots = palloc(sizeof(TupleTableSlot *) * s->nruns);
			s->merge_cxts = palloc(sizeof(MemoryContext) * s->nruns);
			s->merge_has = palloc0(sizeof(bool) * s->nruns);
			for (r = 0; r < s->nruns; r++)
			{
				s->merge_slots[r] = ExecAllocTableSlot(&estate->es_tupleTable, desc, &TTSOpsVirtual);
				s->merge_cxts[r] = AllocSetContextCreate(estate->es_query_cxt, "buildsmart merge row",
														 ALLOCSET_SMALL_SIZES);
			}
			s->merge_cap = s->nruns;
			MemoryContextSwitchTo(old);
		}
		for (r = 0; r < s->nruns; r++)
			s->merge_has[r] = bs_merge_advance(s, r);
		s->merging = true;
	}
	else if (s->merge_last >= 0)
		s->merge_has[s->merge_last] = bs_merge_advance(s, s->merge_last);
	for (r = 0; r < s->nruns; r++)
		if (s->merge_has[r] && (best < 0 || bs_merge_cmp(s, s->merge_slots[r], s->merge_slots[best]) < 0))
			best = r;
	s->merge_last = best;
	return best < 0 ? NULL : s->merge_slots[best];
}

/* Do all runs return their rows in the query's ORDER BY (so a merge suffices)? */
static bool
bs_runs_in_order(BsScanState *s)
{
	int			r;

	if (s->redistinct > 0)
		return false;
	for (r = 0; r < s->nruns; r++)
		if (!s->runs[r].in_order)
			return false;
	return true;
}

static TupleTableSlot *
bs_exec_pushdown(BsScanState *s)
{
	TupleTableSlot *slot = s->css.ss.ss_ScanTupleSlot;
	ExprContext *econtext = s->css.ss.ps.ps_ExprContext;

	if (!s->started)
		bs_dispatch(s, s->css.ss.ps.state);
	for (;;)
	{
		bool		got = false;

		if (s->count >= 0 && s->returned >= s->count)
			return NULL;
		ResetExprContext(econtext);
		if (s->nsort > 0 && s->nfrags_used > 1 && (s->merging || bs_runs_in_order(s)))
		{
			TupleTableSlot *next = bs_merge_next(s);

			got = next != NULL;
			if (got)
				slot = next;
		}
		else if (s->nsort > 0 && s->nfrags_used > 1)
		{
			if (!s->sorted)
			{
				int			r;
				int64		bound = s->count >= 0 && s->redistinct == 0 ? s->count + s->offset : 0;
				MemoryContext old;

				s->sort = tuplesort_begin_heap(slot->tts_tupleDescriptor, s->nsort, s->sort_attno,
											   s->sort_op, s->sort_coll, s->sort_nf,
											   work_mem, NULL,
											   bound > 0 ? TUPLESORT_ALLOWBOUNDED : TUPLESORT_NONE);
				if (bound > 0)
					tuplesort_set_bound(s->sort, bound);
				for (r = 0; r < s->nruns; r++)
				{
					for (;;)
					{
						bool		more;

						old = MemoryContextSwitchTo(econtext->ecxt_per_tuple_memory);
						more = bs_next_row(s, &s->runs[r], slot);
						MemoryContextSwitchTo(old);
						if (!more)
							break;
						tuplesort_puttupleslot(s->sort, slot);
						ResetExprContext(econtext);
					}
				}
				tuplesort_performsort(s->sort);
				s->sorted = true;
			}
			got = tuplesort_gettupleslot(s->sort, true, false, s->sort_slot, NULL);
			if (got)
				slot = s->sort_slot;
			if (got && s->redistinct > 0 && bs_same_distinct_key(s, slot))
				continue;		/* an older piece's row of a key already returned */
		}
		else
		{
			while (s->cur < s->nruns)
			{
				MemoryContext old = MemoryContextSwitchTo(econtext->ecxt_per_tuple_memory);

				got = bs_next_row(s, &s->runs[s->cur], slot);
				MemoryContextSwitchTo(old);
				if (got)
					break;
				s->cur++;
			}
		}
		if (!got)
			return NULL;
		if (s->skipped < s->offset)
		{
			s->skipped++;
			continue;
		}
		s->returned++;
		return slot;
	}
}

static TupleTableSlot *
bs_exec(CustomScanState *node)
{
	BsScanState *s = (BsScanState *) node;
	ExprState  *qual = node->ss.ps.qual;
	ExprContext *econtext = node->ss.ps.ps_ExprContext;

	for (;;)
	{
		TupleTableSlot *slot;

		if (s->fb_child != NULL)
		{
			/* PostgreSQL's plan of the partial query already returns this node's output */
			slot = ExecProcNode(s->fb_child);
			return TupIsNull(slot) ? NULL : slot;
		}
		if (s->fb != NULL)
		{
			TupleTableSlot *in = ExecProcNode(s->fb->planstate);

			if (TupIsNull(in))
			{
				/* an INSERT counts its rows (the command tag reads them before End) */
				if (s->insert && !s->counted)
				{
					node->ss.ps.state->es_processed += s->fb->estate->es_processed;
					s->counted = true;
				}
				return NULL;
			}
			slot = ExecCopySlot(node->ss.ss_ScanTupleSlot, in);
		}
		else
		{
			slot = bs_exec_pushdown(s);
			if (slot == NULL)
			{
				if (s->insert && !s->counted)
				{
					node->ss.ps.state->es_processed += s->processed;
					s->counted = true;
				}
				return NULL;
			}
		}
		econtext->ecxt_scantuple = slot;
		if (qual != NULL && !ExecQual(qual, econtext))
		{
			InstrCountFiltered1(node, 1);
			continue;
		}
		/* a leaf returns only the columns the plan above uses */
		if (node->ss.ps.ps_ProjInfo != NULL)
			return ExecProject(node->ss.ps.ps_ProjInfo);
		return slot;
	}
}

static void
bs_finish_runs(BsScanState *s)
{
	int			r;

	for (r = 0; r < s->nruns; r++)
	{
		BsRun	   *run = &s->runs[r];

		if (run->res != NULL)
		{
			PQclear(run->res);
			run->res = NULL;
		}
		if (!run->done && run->conn != NULL)
		{
			/*
			 * Stopped early. With a LIMIT the worker sends at most count+offset rows: reading the
			 * rest is cheaper than a cancel request (a new connection to the worker). Without
			 * one (a cursor closed early) the worker is stopped.
			 */
			if (s->has_limit)
				bs_conn_finish(run->conn);
			else
				bs_conn_abandon(run->conn);
			run->done = true;
		}
	}
	if (s->sort != NULL)
	{
		tuplesort_end(s->sort);
		s->sort = NULL;
	}
}

static void
bs_end(CustomScanState *node)
{
	BsScanState *s = (BsScanState *) node;

	if (s->fb_child != NULL)
	{
		ExecEndNode(s->fb_child);
		s->fb_child = NULL;
		return;
	}
	if (s->fb != NULL)
	{
		if (!s->explain_only)
			ExecutorFinish(s->fb);

		ExecutorEnd(s->fb);
		FreeQueryDesc(s->fb);
		s->fb = NULL;
		return;
	}
	bs_finish_runs(s);
}

static void
bs_rescan(CustomScanState *node)
{
	BsScanState *s = (BsScanState *) node;

	if (s->fb != NULL || s->fb_child != NULL)
	{
		ExecReScan(s->fb ? s->fb->planstate : s->fb_child);
		return;
	}
	bs_finish_runs(s);
	s->sorted = false;
	s->merging = false;
	s->started = false;
}

/*
 * Can EXPLAIN (without ANALYZE) not evaluate this expression? A PARAM_EXEC comes from a
 * subquery EXPLAIN does not run; a PARAM_EXTERN has no value under EXPLAIN (GENERIC_PLAN).
 */
static bool
bs_unknown_param_walker(Node *node, void *context)
{
	if (node == NULL)
		return false;
	if (IsA(node, Param))
	{
		Param	   *p = (Param *) node;

		if (p->paramkind == PARAM_EXEC || (p->paramkind == PARAM_EXTERN && *(bool *) context))
			return true;
	}
	return expression_tree_walker(node, bs_unknown_param_walker, context);
}

static void
bs_explain(CustomScanState *node, List *ancestors, ExplainState *es)
{
	BsScanState *s = (BsScanState *) node;
	int			r;

	if (s->fb_child != NULL)
	{
		ExplainPropertyText("Runs on", "coordinator (PostgreSQL plan through postgres_fdw, below)", es);
		ExplainPropertyText("Reason", s->fallback, es);
		return;
	}
	if (s->fb != NULL)
	{
		ExplainPropertyText("Runs on", "coordinator (PostgreSQL plan through postgres_fdw)", es);
		ExplainPropertyText("Reason", s->fallback, es);
		{
			PlannedStmt *save_pstmt = es->pstmt;
			List	   *save_rtable = es->rtable;
			List	   *save_names = es->rtable_names;
			List	   *save_cxt = es->deparse_cxt;
			Bitmapset  *save_printed = es->printed_subplans;

			ExplainOpenGroup("Fallback Plan", "Fallback Plan", true, es);
			ExplainPrintPlan(es, s->fb);
			ExplainCloseGroup("Fallback Plan", "Fallback Plan", true, es);
			es->pstmt = save_pstmt;
			es->rtable = save_rtable;
			es->rtable_names = save_names;
			es->deparse_cxt = save_cxt;
			es->printed_subplans = save_printed;
		}
		return;
	}
	ExplainPropertyText("Runs on", "workers", es);
	ExplainPropertyText("Shape", s->note, es);
	if (!s->started)
	{
		/*
		 * Without ANALYZE the fragments are pruned here as the run would prune them, unless a
		 * pruning value comes from a subquery (EXPLAIN does not run it).
		 */
		bool		generic = es->generic;

		if (bs_unknown_param_walker((Node *) s->prune_exprs, &generic))
		{
			ExplainPropertyText("Fragments", psprintf("%d candidate(s), pruned on building when the plan runs",
													  list_length(s->frag_oids)), es);
			if (es->verbose && s->frag_sql != NIL)
				ExplainPropertyText("Remote SQL", strVal(linitial(s->frag_sql)), es);
			return;
		}
		if (s->runs == NULL)
			bs_assign_runs(s, node->ss.ps.ps_ExprContext);
	}
	ExplainPropertyText("Fragments", psprintf("%d of %d on %d node(s)", s->nfrags_used, s->nfrags_total, s->nruns), es);
	if (s->nsort > 0 && s->nfrags_used > 1)
		ExplainPropertyText("Merge", s->has_limit ? "sort by ORDER BY keys, then OFFSET/LIMIT" : "sort by ORDER BY keys", es);
	for (r = 0; r < s->nruns; r++)
	{
		BsRun	   *run = &s->runs[r];
		StringInfoData buf;
		ListCell   *lc;
		bool		first = true;

		initStringInfo(&buf);
		foreach(lc, run->fragments)
		{
			appendStringInfo(&buf, "%s%s", first ? "" : ", ", (char *) lfirst(lc));
			first = false;
		}
		if (es->analyze)
			appendStringInfo(&buf, " (rows=" INT64_FORMAT ", first result %.1f ms)", run->rows, run->ms);
		ExplainPropertyText(psprintf("Node %s", run->node), buf.data, es);
		if (es->verbose)
			ExplainPropertyText(psprintf("Remote SQL (%s)", run->node), run->sql, es);
	}
}

/* ---------------------------------------------------------------- write detection */

static bool
bs_is_fragment_or_dist(Oid relid)
{
	char		kind = get_rel_relkind(relid);

	if (kind == RELKIND_FOREIGN_TABLE)
		return true;
	if (kind == RELKIND_PARTITIONED_TABLE)
	{
		char	   *name = get_rel_name(relid);
		char	   *nsp = get_namespace_name(get_rel_namespace(relid));

		return name && nsp && strcmp(name, "readings") == 0 && strcmp(nsp, "public") == 0;
	}
	return false;
}

static void
bs_executor_start(QueryDesc *queryDesc, int eflags)
{
	PlannedStmt *ps = queryDesc->plannedstmt;

	if (!(eflags & EXEC_FLAG_EXPLAIN_ONLY) && ps->commandType != CMD_SELECT && ps->resultRelations != NIL)
	{
		ListCell   *lc;

		foreach(lc, ps->resultRelations)
		{
			RangeTblEntry *rte = rt_fetch(lfirst_int(lc), ps->rtable);

			if (rte->rtekind == RTE_RELATION && bs_is_fragment_or_dist(rte->relid))
				bs_xact_wrote_through_fdw = true;
		}
	}
	bs_exec_depth++;
	PG_TRY();
	{
		if (prev_executor_start)
			prev_executor_start(queryDesc, eflags);
		else
			standard_ExecutorStart(queryDesc, eflags);
	}
	PG_CATCH();
	{
		bs_exec_depth--;
		PG_RE_THROW();
	}
	PG_END_TRY();
}

static void
bs_executor_end(QueryDesc *queryDesc)
{
	if (bs_exec_depth > 0)
		bs_exec_depth--;
	if (prev_executor_end)
		prev_executor_end(queryDesc);
	else
		standard_ExecutorEnd(queryDesc);
}

static void
bs_process_utility(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
				   ProcessUtilityContext context, ParamListInfo params,
				   QueryEnvironment *queryEnv, DestReceiver *dest, QueryCompletion *qc)
{
	Node	   *stmt = pstmt->utilityStmt;

	if (IsA(stmt, CopyStmt) && ((CopyStmt *) stmt)->is_from && ((CopyStmt *) stmt)->relation != NULL)
	{
		Oid			relid = RangeVarGetRelid(((CopyStmt *) stmt)->relation, NoLock, true);

		if (OidIsValid(relid) && bs_is_fragment_or_dist(relid))
			bs_xact_wrote_through_fdw = true;
	}
	if (prev_process_utility)
		prev_process_utility(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
}
