/*
 * copy_router.c: COPY into the distributed table, streamed to the workers.
 *
 * Why: PostgreSQL routes each row of a COPY into a foreign partition through postgres_fdw, which
 * sends batched INSERTs and waits for each batch before it parses the next rows: the coordinator
 * and the worker take turns (measured: worker 60% busy, coordinator 18%, rarely both). Here the
 * coordinator parses the client's rows with PostgreSQL's own COPY code (BeginCopyFrom and
 * NextCopyFrom: every format and option, column lists, defaults, errors naming the line) and
 * streams them as COPY BINARY into one COPY per fragment on its worker, so parsing on the
 * coordinator, sending, and inserting on the workers overlap, and fragments on different workers
 * load at the same time. Rows go into the fragment tables themselves, so their triggers run as
 * for any SQL write: the latest value wins, the rollups' change log is written.
 *
 * Scope: a top-level COPY ... FROM STDIN into a distributed table, outside a transaction block,
 * without WHERE or ON_ERROR options, by a user with INSERT on the table, with no row security and
 * no triggers on the coordinator table, while every fragment is a plain postgres_fdw table (not
 * during a split's switch). Anything else runs PostgreSQL's COPY through postgres_fdw as before;
 * `buildsmart.enable_copy_router = off` always does.
 *
 * Transactions: every stream writes in one remote transaction; they are committed together after
 * the last row was accepted by every worker, the same guarantee postgres_fdw gives (a worker
 * failing between two of the final COMMITs leaves the others committed). An error before that
 * (a bad row, a row no fragment holds, a worker refusing a row, a lost connection) closes every
 * stream, so nothing of the COPY is stored. The table's ROW EXCLUSIVE lock, held until the
 * coordinator commits, keeps an online move or split from switching a fragment under the COPY
 * (their switch locks the table EXCLUSIVE).
 */
#include "buildsmart.h"

#include "access/table.h"
#include "access/xact.h"
#include "catalog/namespace.h"
#include "catalog/pg_type.h"
#include "commands/copy.h"
#include "executor/executor.h"
#include "foreign/foreign.h"
#include "libpq/libpq-be-fe-helpers.h"
#include "miscadmin.h"
#include "parser/parse_relation.h"
#include "pgstat.h"
#include "commands/progress.h"
#include "tcop/utility.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/lsyscache.h"
#include "utils/memutils.h"
#include "utils/rel.h"
#include "utils/rls.h"

#define BS_COPY_FLUSH_BYTES (256 * 1024)

bool		bs_enable_copy_router = true;

static ProcessUtility_hook_type prev_process_utility = NULL;

typedef struct BsCopyStream
{
	BsRoute    *route;
	BsConn	   *conn;			/* private connection, opened at the fragment's first row */
	StringInfoData buf;			/* COPY BINARY bytes not yet sent */
	uint64		rows;
} BsCopyStream;

typedef struct BsCopyRouter
{
	Relation	rel;
	int			natts;
	AttrNumber	building;		/* attribute numbers (1-based) */
	AttrNumber	ts;
	FmgrInfo   *send;			/* binary send function per attribute */
	char	   *columns;		/* quoted column list for the workers' COPY */
	int			nstreams;
	BsCopyStream *streams;
	int			last;			/* stream of the previous row: input is usually grouped */
} BsCopyRouter;

/* Options that change what NextCopyFrom returns in ways this loop does not follow. */
static bool
bs_copy_options_supported(List *options)
{
	ListCell   *lc;

	foreach(lc, options)
	{
		DefElem    *d = lfirst(lc);

		if (strcmp(d->defname, "on_error") == 0 || strcmp(d->defname, "reject_limit") == 0 ||
			strcmp(d->defname, "log_verbosity") == 0 || strcmp(d->defname, "freeze") == 0)
			return false;
	}
	return true;
}

static void
bs_copy_send_buffer(BsCopyStream *s)
{
	if (s->buf.len == 0)
		return;
	if (PQputCopyData(bs_conn_pg(s->conn), s->buf.data, s->buf.len) != 1)
	{
		/* the worker ended the COPY with an error (a row it refused): report its error */
		PGresult   *res = libpqsrv_get_result_last(bs_conn_pg(s->conn), PG_WAIT_EXTENSION);

		bs_report_remote_error(ERROR, res, s->conn, "COPY");
	}
	resetStringInfo(&s->buf);
}

static void
bs_copy_start(BsCopyRouter *r, BsCopyStream *s)
{
	StringInfoData sql;
	PGresult   *res;
	static const char header[] = "PGCOPY\n\377\r\n\0\0\0\0\0\0\0\0\0";	/* signature, flags, ext */

	s->conn = bs_open_private_conn(GetForeignTable(s->route->relid)->serverid, "buildsmart:copy");
	initStringInfo(&sql);
	appendStringInfo(&sql, "START TRANSACTION; COPY %s (%s) FROM STDIN (FORMAT binary)",
					 s->route->qualified_name, r->columns);
	res = libpqsrv_exec(bs_conn_pg(s->conn), sql.data, PG_WAIT_EXTENSION);
	/* a multi-statement string returns the last result: COPY IN */
	if (PQresultStatus(res) != PGRES_COPY_IN)
		bs_report_remote_error(ERROR, res, s->conn, sql.data);
	PQclear(res);
	initStringInfo(&s->buf);
	appendBinaryStringInfo(&s->buf, header, 19);
	elog(DEBUG1, "buildsmart: COPY stream to %s on node %s", s->route->qualified_name, bs_conn_name(s->conn));
}

/* The stream of the fragment holding (building, ts), by the partition bounds. */
static BsCopyStream *
bs_copy_route_row(BsCopyRouter *r, Datum *values, bool *nulls)
{
	int			i;

	if (!nulls[r->building - 1])
	{
		TimestampTz ts = nulls[r->ts - 1] ? 0 : DatumGetTimestampTz(values[r->ts - 1]);

		for (i = -1; i < r->nstreams; i++)
		{
			int			k = i < 0 ? r->last : i;
			BsRoute    *f;

			if (k < 0 || (i >= 0 && k == r->last))
				continue;
			f = r->streams[k].route;
			if (!bs_building_in_range(f->lower, f->upper, values[r->building - 1]))
				continue;
			if (f->time_piece &&
				(nulls[r->ts - 1] || !bs_time_may_hold(f->ts_lower, f->ts_upper, BS_PRUNE_TS_EQ, ts)))
				continue;
			r->last = k;
			return &r->streams[k];
		}
	}
	ereport(ERROR,
			(errcode(ERRCODE_CHECK_VIOLATION),
			 errmsg("no partition of relation \"%s\" found for row", RelationGetRelationName(r->rel)),
			 nulls[r->building - 1]
			 ? errdetail("Partition key of the failing row contains (building) = (null).")
			 : errdetail("Partition key of the failing row contains (building) = (%s).",
						 TextDatumGetCString(values[r->building - 1]))));
	return NULL;				/* keep the compiler quiet */
}

static void
bs_copy_append_row(BsCopyRouter *r, BsCopyStream *s, Datum *values, bool *nulls)
{
	uint16		n = pg_hton16((uint16) r->natts);
	int			i;

	appendBinaryStringInfo(&s->buf, (char *) &n, 2);
	for (i = 0; i < r->natts; i++)
	{
		if (nulls[i])
		{
			int32		len = pg_hton32((uint32) -1);

			appendBinaryStringInfo(&s->buf, (char *) &len, 4);
		}
		else
		{
			bytea	   *b = SendFunctionCall(&r->send[i], values[i]);
			uint32		len = pg_hton32((uint32) VARSIZE(b) - VARHDRSZ);

			appendBinaryStringInfo(&s->buf, (char *) &len, 4);
			appendBinaryStringInfo(&s->buf, VARDATA(b), VARSIZE(b) - VARHDRSZ);
		}
	}
	s->rows++;
	if (s->buf.len >= BS_COPY_FLUSH_BYTES)
		bs_copy_send_buffer(s);
}

/* End every stream's COPY, then commit them all (sent together so the workers commit at once). */
static void
bs_copy_finish(BsCopyRouter *r)
{
	int			i;
	static const char trailer[2] = {'\377', '\377'};

	for (i = 0; i < r->nstreams; i++)
	{
		BsCopyStream *s = &r->streams[i];
		PGresult   *res;

		if (s->conn == NULL)
			continue;
		appendBinaryStringInfo(&s->buf, trailer, 2);
		bs_copy_send_buffer(s);
		if (PQputCopyEnd(bs_conn_pg(s->conn), NULL) != 1)
			bs_report_remote_error(ERROR, NULL, s->conn, "COPY");
		res = libpqsrv_get_result_last(bs_conn_pg(s->conn), PG_WAIT_EXTENSION);
		if (PQresultStatus(res) != PGRES_COMMAND_OK)
			bs_report_remote_error(ERROR, res, s->conn, "COPY");
		if (strtoull(PQcmdTuples(res), NULL, 10) != s->rows)
			ereport(ERROR,
					(errcode(ERRCODE_DATA_CORRUPTED),
					 errmsg("node %s stored %s of %llu rows of the COPY into %s", bs_conn_name(s->conn),
							PQcmdTuples(res), (unsigned long long) s->rows, s->route->qualified_name)));
		PQclear(res);
	}
	for (i = 0; i < r->nstreams; i++)
		if (r->streams[i].conn != NULL && !PQsendQuery(bs_conn_pg(r->streams[i].conn), "COMMIT"))
			bs_report_remote_error(ERROR, NULL, r->streams[i].conn, "COMMIT");
	for (i = 0; i < r->nstreams; i++)
	{
		BsCopyStream *s = &r->streams[i];
		PGresult   *res;

		if (s->conn == NULL)
			continue;
		res = libpqsrv_get_result_last(bs_conn_pg(s->conn), PG_WAIT_EXTENSION);
		if (PQresultStatus(res) != PGRES_COMMAND_OK)
			bs_report_remote_error(ERROR, res, s->conn, "COMMIT");
		PQclear(res);
	}
}

static void
bs_copy_close(BsCopyRouter *r)
{
	int			i;

	for (i = 0; i < r->nstreams; i++)
		if (r->streams[i].conn != NULL)
		{
			bs_close_private_conn(r->streams[i].conn);	/* an open remote transaction rolls back */
			r->streams[i].conn = NULL;
		}
}

static uint64
bs_copy_run(ParseState *pstate, CopyStmt *stmt, Relation rel, List *routes)
{
	BsCopyRouter r;
	TupleDesc	desc = RelationGetDescr(rel);
	CopyFromState cstate;
	EState	   *estate = CreateExecutorState();
	ExprContext *econtext = GetPerTupleExprContext(estate);
	Datum	   *values;
	bool	   *nulls;
	StringInfoData cols;
	ErrorContextCallback errcallback;
	uint64		processed = 0;
	ListCell   *lc;
	int			i;

	memset(&r, 0, sizeof(r));
	r.rel = rel;
	r.natts = desc->natts;
	r.building = get_attnum(RelationGetRelid(rel), "building");
	r.ts = get_attnum(RelationGetRelid(rel), "ts");
	r.send = palloc0(sizeof(FmgrInfo) * r.natts);
	r.last = -1;
	initStringInfo(&cols);
	for (i = 0; i < r.natts; i++)
	{
		Form_pg_attribute att = TupleDescAttr(desc, i);
		Oid			fn;
		bool		varlena;

		if (att->attisdropped || att->attgenerated)
			ereport(ERROR, (errmsg("buildsmart: COPY router called for a table with dropped or generated columns")));
		getTypeBinaryOutputInfo(att->atttypid, &fn, &varlena);
		fmgr_info(fn, &r.send[i]);
		appendStringInfo(&cols, "%s%s", i ? ", " : "", quote_identifier(NameStr(att->attname)));
	}
	r.columns = cols.data;
	r.nstreams = list_length(routes);
	r.streams = palloc0(sizeof(BsCopyStream) * r.nstreams);
	i = 0;
	foreach(lc, routes)
		r.streams[i++].route = lfirst(lc);
	values = palloc(sizeof(Datum) * r.natts);
	nulls = palloc(sizeof(bool) * r.natts);

	cstate = BeginCopyFrom(pstate, rel, NULL, stmt->filename, stmt->is_program, NULL, stmt->attlist, stmt->options);
	PG_TRY();
	{
		errcallback.callback = CopyFromErrorCallback;
		errcallback.arg = cstate;
		errcallback.previous = error_context_stack;
		error_context_stack = &errcallback;
		for (;;)
		{
			BsCopyStream *s;
			MemoryContext old;

			CHECK_FOR_INTERRUPTS();
			ResetPerTupleExprContext(estate);
			old = MemoryContextSwitchTo(GetPerTupleMemoryContext(estate));
			if (!NextCopyFrom(cstate, econtext, values, nulls))
			{
				MemoryContextSwitchTo(old);
				break;
			}
			s = bs_copy_route_row(&r, values, nulls);
			MemoryContextSwitchTo(old);
			if (s->conn == NULL)
				bs_copy_start(&r, s);
			old = MemoryContextSwitchTo(GetPerTupleMemoryContext(estate));
			bs_copy_append_row(&r, s, values, nulls);
			MemoryContextSwitchTo(old);
			if (++processed % 1000 == 0)
				pgstat_progress_update_param(PROGRESS_COPY_TUPLES_PROCESSED, (int64) processed);
		}
		error_context_stack = errcallback.previous;
		pgstat_progress_update_param(PROGRESS_COPY_TUPLES_PROCESSED, (int64) processed);
		bs_copy_finish(&r);
	}
	PG_CATCH();
	{
		bs_copy_close(&r);
		PG_RE_THROW();
	}
	PG_END_TRY();
	bs_copy_close(&r);
	EndCopyFrom(cstate);
	FreeExecutorState(estate);
	{
		int			used = 0;

		for (i = 0; i < r.nstreams; i++)
			used += r.streams[i].rows > 0;
		ereport(bs_log_pushdown ? LOG : DEBUG1,
				(errmsg_internal("buildsmart: COPY %s streamed %llu rows to %d of %d fragments",
								 RelationGetRelationName(rel), (unsigned long long) processed, used, r.nstreams)));
	}
	return processed;
}

/*
 * Can this COPY be routed here? Returns the open relation (ROW EXCLUSIVE, held to commit) and
 * its fragments, or NULL for PostgreSQL's own COPY.
 */
static Relation
bs_copy_target(ParseState *pstate, CopyStmt *stmt, List **routes)
{
	Relation	rel;
	Oid			relid;
	ParseNamespaceItem *nsitem;
	RTEPermissionInfo *perminfo;
	TupleDesc	desc;
	List	   *attnums;
	ListCell   *lc;
	int			i;

	if (!bs_enable_copy_router || !stmt->is_from || stmt->relation == NULL || stmt->query != NULL ||
		stmt->filename != NULL || stmt->is_program || stmt->whereClause != NULL ||
		IsTransactionBlock() || !bs_copy_options_supported(stmt->options))
		return NULL;
	relid = RangeVarGetRelid(stmt->relation, NoLock, true);
	if (!OidIsValid(relid) || get_rel_relkind(relid) != RELKIND_PARTITIONED_TABLE || !bs_is_distributed(relid))
		return NULL;
	rel = table_openrv(stmt->relation, RowExclusiveLock);
	desc = RelationGetDescr(rel);
	for (i = 0; i < desc->natts; i++)
		if (TupleDescAttr(desc, i)->attisdropped || TupleDescAttr(desc, i)->attgenerated)
		{
			table_close(rel, NoLock);
			return NULL;
		}
	if (rel->trigdesc != NULL || check_enable_rls(RelationGetRelid(rel), InvalidOid, true) != RLS_NONE)
	{
		table_close(rel, NoLock);
		return NULL;
	}
	/* the privileges PostgreSQL's COPY checks: INSERT on the columns it writes */
	nsitem = addRangeTableEntryForRelation(pstate, rel, RowExclusiveLock, NULL, false, false);
	perminfo = nsitem->p_perminfo;
	perminfo->requiredPerms = ACL_INSERT;
	attnums = CopyGetAttnums(desc, rel, stmt->attlist);
	foreach(lc, attnums)
		perminfo->insertedCols = bms_add_member(perminfo->insertedCols,
												lfirst_int(lc) - FirstLowInvalidHeapAttributeNumber);
	ExecCheckPermissions(pstate->p_rtable, list_make1(perminfo), true);
	PreventCommandIfReadOnly("COPY FROM");
	PreventCommandIfParallelMode("COPY FROM");
	*routes = bs_routing_fragments(RelationGetRelid(rel));
	if (*routes == NIL)
	{
		table_close(rel, NoLock);
		return NULL;
	}
	return rel;
}

static void
bs_process_utility(PlannedStmt *pstmt, const char *queryString, bool readOnlyTree,
				   ProcessUtilityContext context, ParamListInfo params, QueryEnvironment *queryEnv,
				   DestReceiver *dest, QueryCompletion *qc)
{
	Node	   *parsetree = pstmt->utilityStmt;

	if (IsA(parsetree, CopyStmt) && context == PROCESS_UTILITY_TOPLEVEL)
	{
		ParseState *pstate = make_parsestate(NULL);
		List	   *routes = NIL;
		Relation	rel;

		pstate->p_sourcetext = queryString;
		pstate->p_queryEnv = queryEnv;
		rel = bs_copy_target(pstate, (CopyStmt *) parsetree, &routes);
		if (rel != NULL)
		{
			uint64		n = bs_copy_run(pstate, (CopyStmt *) parsetree, rel, routes);

			table_close(rel, NoLock);
			free_parsestate(pstate);
			if (qc)
				SetQueryCompletion(qc, CMDTAG_COPY, n);
			return;
		}
		free_parsestate(pstate);
	}
	if (prev_process_utility)
		prev_process_utility(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
	else
		standard_ProcessUtility(pstmt, queryString, readOnlyTree, context, params, queryEnv, dest, qc);
}

void
bs_copy_router_init(void)
{
	prev_process_utility = ProcessUtility_hook;
	ProcessUtility_hook = bs_process_utility;
}
