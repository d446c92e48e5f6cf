/*
 * remote.c: the coordinator session's connections to the workers for pushed-down queries.
 *
 * One libpq connection per (foreign server, user) per session, made from the same server and
 * user mapping options postgres_fdw uses, so moving a node (ALTER SERVER) or a failover
 * (target_session_attrs=read-write in the server options) is followed without DDL.
 *
 * Semantics follow the local transaction:
 *  - READ COMMITTED: every pushed-down statement runs in its own remote transaction, so it sees
 *    what was committed when it started, as a local statement would;
 *  - REPEATABLE READ / SERIALIZABLE: one READ ONLY remote transaction of the same level per local
 *    transaction, committed or rolled back with it (postgres_fdw's rule), so repeated reads agree.
 * The remote session gets the local session's TimeZone, DateStyle, IntervalStyle and
 * extra_float_digits before each statement (when they changed), so date_trunc(), extract(),
 * casts and AT TIME ZONE evaluated on a worker give what they would give locally. search_path is
 * pg_catalog: every shipped name is schema-qualified when it is not a built-in.
 */
#include "buildsmart.h"

#include "access/xact.h"
#include "catalog/pg_foreign_server.h"
#include "catalog/pg_user_mapping.h"
#include "commands/defrem.h"
#include "foreign/foreign.h"
#include "libpq/libpq-be-fe-helpers.h"
#include "miscadmin.h"
#include "pgstat.h"
#include "storage/latch.h"
#include "utils/builtins.h"
#include "utils/float.h"
#include "utils/guc.h"
#include "common/hashfn.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/memutils.h"
#include "utils/syscache.h"
#include "utils/timestamp.h"
#include "utils/wait_event.h"

typedef struct BsConnKey
{
	Oid			serverid;
	Oid			userid;
} BsConnKey;

/*
 * Statements this connection has seen: the second time a statement text comes, it is prepared
 * on the worker under a name and executed by name from then on, so the worker parses and plans
 * it once (and may keep a generic plan), as the coordinator does for a prepared statement. Text
 * seen once is sent unnamed: one-off queries do not fill the worker with statements.
 */
#define BS_MAX_STATEMENTS 64

typedef struct BsStatement
{
	uint32		hash;
	char	   *sql;
	int			nparams;
	Oid		   *types;
	bool		prepared;
	int			number;			/* bs_stmt_<number> on the worker */
	uint64		last_used;
} BsStatement;

struct BsConn
{
	BsConnKey	key;
	PGconn	   *conn;
	char		name[NAMEDATALEN];	/* foreign server name, for messages */
	bool		in_xact;		/* a remote transaction is open */
	bool		xact_failed;	/* ... and a statement in it failed */
	bool		busy;			/* a statement was sent and its results are not all read */
	bool		invalid;		/* server or user mapping changed: reconnect when idle */
	bool		synced;			/* the settings below were sent */
	char		tz[128];
	char		datestyle[64];
	char		intervalstyle[32];
	int			efd;
	MemoryContext stmt_cxt;		/* the statements below, dropped with the session */
	BsStatement stmts[BS_MAX_STATEMENTS];
	int			nstmts;
	int			next_number;
	uint64		clock;
};

static HTAB *bs_conns = NULL;
static uint32 bs_wait_event = 0;
static const char *bs_connect_appname = "buildsmart:pushdown";

static void bs_xact_callback(XactEvent event, void *arg);
static void bs_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
								SubTransactionId parentSubid, void *arg);
static void bs_inval_callback(Datum arg, int cacheid, uint32 hashvalue);

void
bs_remote_init(void)
{
	RegisterXactCallback(bs_xact_callback, NULL);
	RegisterSubXactCallback(bs_subxact_callback, NULL);
	CacheRegisterSyscacheCallback(FOREIGNSERVEROID, bs_inval_callback, (Datum) 0);
	CacheRegisterSyscacheCallback(USERMAPPINGOID, bs_inval_callback, (Datum) 0);
}

static void
bs_ensure_hash(void)
{
	HASHCTL		ctl;

	if (bs_conns != NULL)
		return;
	ctl.keysize = sizeof(BsConnKey);
	ctl.entrysize = sizeof(BsConn);
	bs_conns = hash_create("buildsmart worker connections", 8, &ctl, HASH_ELEM | HASH_BLOBS);
	bs_wait_event = WaitEventExtensionNew("BuildSmartRemote");
}

static void
bs_inval_callback(Datum arg, int cacheid, uint32 hashvalue)
{
	HASH_SEQ_STATUS scan;
	BsConn	   *c;

	if (bs_conns == NULL)
		return;
	/* A node moved or its credentials changed: reconnect before the next statement. */
	hash_seq_init(&scan, bs_conns);
	while ((c = hash_seq_search(&scan)) != NULL)
		c->invalid = true;
}

static void
bs_disconnect(BsConn *c)
{
	if (c->conn != NULL)
	{
		libpqsrv_disconnect(c->conn);
		c->conn = NULL;
	}
	if (c->stmt_cxt != NULL)
		MemoryContextReset(c->stmt_cxt);
	c->nstmts = 0;
	c->in_xact = false;
	c->xact_failed = false;
	c->busy = false;
	c->synced = false;
}

/* Is this a libpq connection option (and not one of postgres_fdw's own)? */
static bool
bs_is_libpq_option(const char *name)
{
	static PQconninfoOption *opts = NULL;
	PQconninfoOption *o;

	if (opts == NULL)
	{
		opts = PQconndefaults();
		if (opts == NULL)
			ereport(ERROR, (errcode(ERRCODE_OUT_OF_MEMORY), errmsg("out of memory")));
	}
	for (o = opts; o->keyword != NULL; o++)
	{
		/* debug options ("D") are not for users */
		if (strcmp(o->keyword, name) == 0 && strchr(o->dispchar, 'D') == NULL)
			return true;
	}
	return false;
}

static void
bs_connect(BsConn *c, ForeignServer *server, UserMapping *um)
{
	int			n = list_length(server->options) + list_length(um->options) + 3;
	const char **keywords = palloc0(sizeof(char *) * n);
	const char **values = palloc0(sizeof(char *) * n);
	int			i = 0;
	ListCell   *lc;
	bool		has_password = false;
	bool		passfile_ok = false;
	PGresult   *res;

	foreach(lc, server->options)
	{
		DefElem    *d = lfirst(lc);

		if (bs_is_libpq_option(d->defname) && strcmp(d->defname, "user") != 0 &&
			strcmp(d->defname, "password") != 0)
		{
			keywords[i] = d->defname;
			values[i++] = defGetString(d);
		}
	}
	foreach(lc, um->options)
	{
		DefElem    *d = lfirst(lc);

		/* set by a superuser only: the password comes from the server's passfile */
		if (strcmp(d->defname, "password_required") == 0 && !defGetBoolean(d))
			passfile_ok = true;
		if (bs_is_libpq_option(d->defname))
		{
			keywords[i] = d->defname;
			values[i++] = defGetString(d);
			if (strcmp(d->defname, "password") == 0 && values[i - 1][0] != '\0')
				has_password = true;
		}
	}
	keywords[i] = "application_name";
	values[i++] = bs_connect_appname;
	keywords[i] = NULL;
	values[i] = NULL;

	/*
	 * As postgres_fdw: a non-superuser may only connect with a password, so a client cannot use
	 * the server's own OS identity (peer or trust authentication) on a worker. A mapping a
	 * superuser made with password_required 'false' takes it from the server's passfile; the
	 * check after connecting still refuses a worker that did not ask for a password.
	 */
	if (!superuser_arg(um->userid) && !has_password && !passfile_ok)
		ereport(ERROR,
				(errcode(ERRCODE_S_R_E_PROHIBITED_SQL_STATEMENT_ATTEMPTED),
				 errmsg("password is required to reach node %s", c->name),
				 errdetail("Non-superusers must give a password in the user mapping.")));

	c->conn = libpqsrv_connect_params(keywords, values, false, bs_wait_event);
	pfree(keywords);
	pfree(values);
	if (c->conn == NULL || PQstatus(c->conn) != CONNECTION_OK)
	{
		char	   *msg = c->conn ? pchomp(PQerrorMessage(c->conn)) : pstrdup("out of memory");

		bs_disconnect(c);
		ereport(ERROR,
				(errcode(ERRCODE_SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION),
				 errmsg("could not connect to node %s: %s", c->name, msg)));
	}
	if (!superuser_arg(um->userid) && !PQconnectionUsedPassword(c->conn))
	{
		bs_disconnect(c);
		ereport(ERROR,
				(errcode(ERRCODE_S_R_E_PROHIBITED_SQL_STATEMENT_ATTEMPTED),
				 errmsg("node %s did not ask for the password of the user mapping", c->name),
				 errdetail("Non-superusers may only reach workers with password authentication.")));
	}
	res = libpqsrv_exec(c->conn, "SET search_path = pg_catalog", bs_wait_event);
	if (PQresultStatus(res) != PGRES_COMMAND_OK)
	{
		PQclear(res);
		bs_disconnect(c);
		ereport(ERROR, (errmsg("could not set up the session on node %s", c->name)));
	}
	PQclear(res);
	c->invalid = false;
	c->synced = false;
}

static void
bs_exec_or_error(BsConn *c, const char *sql)
{
	PGresult   *res = libpqsrv_exec(c->conn, sql, bs_wait_event);

	if (PQresultStatus(res) != PGRES_COMMAND_OK)
		bs_report_remote_error(ERROR, res, c, sql);
	PQclear(res);
}

/* Send the session settings that change what worker-side expressions return. */
static void
bs_sync_settings(BsConn *c)
{
	const char *tz = GetConfigOption("TimeZone", false, false);
	const char *ds = GetConfigOption("DateStyle", false, false);
	const char *is = GetConfigOption("IntervalStyle", false, false);
	StringInfoData buf;

	if (c->synced && strcmp(c->tz, tz) == 0 && strcmp(c->datestyle, ds) == 0 &&
		strcmp(c->intervalstyle, is) == 0 && c->efd == extra_float_digits)
		return;
	initStringInfo(&buf);
	appendStringInfo(&buf, "SET TimeZone = %s; SET DateStyle = %s; SET IntervalStyle = %s; SET extra_float_digits = %d",
					 quote_literal_cstr(tz), quote_literal_cstr(ds), quote_literal_cstr(is),
					 Max(extra_float_digits, 1));
	bs_exec_or_error(c, buf.data);
	strlcpy(c->tz, tz, sizeof(c->tz));
	strlcpy(c->datestyle, ds, sizeof(c->datestyle));
	strlcpy(c->intervalstyle, is, sizeof(c->intervalstyle));
	c->efd = extra_float_digits;
	c->synced = true;
	pfree(buf.data);
}

BsConn *
bs_get_conn(Oid serverid, bool *in_xact_mode)
{
	BsConnKey	key;
	BsConn	   *c;
	bool		found;
	ForeignServer *server;
	UserMapping *um;
	bool		want_xact = IsolationUsesXactSnapshot();

	bs_ensure_hash();
	memset(&key, 0, sizeof(key));
	key.serverid = serverid;
	key.userid = GetUserId();
	c = hash_search(bs_conns, &key, HASH_ENTER, &found);
	if (!found)
	{
		c->conn = NULL;
		c->in_xact = c->xact_failed = c->busy = c->invalid = c->synced = false;
		c->stmt_cxt = AllocSetContextCreate(TopMemoryContext, "buildsmart worker statements",
											ALLOCSET_SMALL_SIZES);
		c->nstmts = 0;
		c->next_number = 0;
		c->clock = 0;
	}
	server = GetForeignServer(serverid);
	strlcpy(c->name, server->servername, sizeof(c->name));
	if (c->busy)
		bs_conn_abandon(c);
	if (c->conn != NULL && (PQstatus(c->conn) != CONNECTION_OK || (c->invalid && !c->in_xact)))
	{
		if (c->in_xact)
			ereport(ERROR,
					(errcode(ERRCODE_CONNECTION_FAILURE),
					 errmsg("the connection to node %s was lost inside a transaction", c->name),
					 errhint("Roll back and run the transaction again.")));
		bs_disconnect(c);
	}
	if (c->conn == NULL)
	{
		um = GetUserMapping(key.userid, serverid);
		bs_connect(c, server, um);
	}
	if (c->xact_failed)
		ereport(ERROR,
				(errcode(ERRCODE_IN_FAILED_SQL_TRANSACTION),
				 errmsg("a statement on node %s failed earlier in this transaction", c->name),
				 errhint("Roll back the transaction.")));
	bs_sync_settings(c);
	if (want_xact && !c->in_xact)
	{
		bs_exec_or_error(c, IsolationIsSerializable()
						 ? "START TRANSACTION ISOLATION LEVEL SERIALIZABLE READ ONLY"
						 : "START TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY");
		c->in_xact = true;
	}
	if (in_xact_mode)
		*in_xact_mode = c->in_xact;
	return c;
}

PGconn *
bs_conn_pg(BsConn *c)
{
	return c->conn;
}

const char *
bs_conn_name(BsConn *c)
{
	return c->name;
}

static BsStatement *
bs_find_statement(BsConn *c, const char *sql, int nparams, const Oid *types, uint32 hash)
{
	int			i;

	for (i = 0; i < c->nstmts; i++)
	{
		BsStatement *st = &c->stmts[i];

		if (st->hash == hash && st->nparams == nparams && strcmp(st->sql, sql) == 0 &&
			(nparams == 0 || memcmp(st->types, types, sizeof(Oid) * nparams) == 0))
			return st;
	}
	return NULL;
}

static BsStatement *
bs_remember_statement(BsConn *c, const char *sql, int nparams, const Oid *types, uint32 hash)
{
	BsStatement *st;
	MemoryContext old;

	if (c->nstmts < BS_MAX_STATEMENTS)
		st = &c->stmts[c->nstmts++];
	else
	{
		int			i,
					victim = 0;

		/* evict the least recently used; a prepared one is deallocated on the worker */
		for (i = 1; i < c->nstmts; i++)
			if (c->stmts[i].last_used < c->stmts[victim].last_used)
				victim = i;
		st = &c->stmts[victim];
		if (st->prepared)
		{
			char		buf[64];
			PGresult   *res;

			snprintf(buf, sizeof(buf), "DEALLOCATE bs_stmt_%d", st->number);
			res = libpqsrv_exec(c->conn, buf, bs_wait_event);
			PQclear(res);
		}
		pfree(st->sql);
		if (st->types)
			pfree(st->types);
	}
	old = MemoryContextSwitchTo(c->stmt_cxt);
	st->hash = hash;
	st->sql = pstrdup(sql);
	st->nparams = nparams;
	st->types = nparams > 0 ? palloc(sizeof(Oid) * nparams) : NULL;
	if (nparams > 0)
		memcpy(st->types, types, sizeof(Oid) * nparams);
	MemoryContextSwitchTo(old);
	st->prepared = false;
	st->number = ++c->next_number;
	return st;
}

void
bs_conn_send(BsConn *c, const char *sql, int nparams, const Oid *types,
			 const char *const *values, const int *lengths, const int *formats,
			 int result_format)
{
	uint32		hash = hash_bytes((const unsigned char *) sql, strlen(sql));
	BsStatement *st = bs_find_statement(c, sql, nparams, types, hash);
	int			ok;

	if (st == NULL)
		st = bs_remember_statement(c, sql, nparams, types, hash);
	else if (!st->prepared)
	{
		char		name[32];
		PGresult   *res;

		/* seen before: prepare it for this and every later execution */
		snprintf(name, sizeof(name), "bs_stmt_%d", st->number);
		if (!PQsendPrepare(c->conn, name, sql, nparams, types))
			res = NULL;
		else
			res = libpqsrv_get_result_last(c->conn, bs_wait_event);
		if (res == NULL || PQresultStatus(res) != PGRES_COMMAND_OK)
			bs_report_remote_error(ERROR, res, c, sql);
		PQclear(res);
		st->prepared = true;
	}
	st->last_used = ++c->clock;
	if (st->prepared)
	{
		char		name[32];

		snprintf(name, sizeof(name), "bs_stmt_%d", st->number);
		ok = PQsendQueryPrepared(c->conn, name, nparams, values, lengths, formats, result_format);
	}
	else
		ok = PQsendQueryParams(c->conn, sql, nparams, types, values, lengths, formats, result_format);
	if (!ok)
	{
		char	   *msg = pchomp(PQerrorMessage(c->conn));

		bs_disconnect(c);
		ereport(ERROR,
				(errcode(ERRCODE_CONNECTION_FAILURE),
				 errmsg("could not send a query to node %s: %s", c->name, msg)));
	}
	c->busy = true;
}

PGresult *
bs_conn_get_result(BsConn *c)
{
	PGresult   *res = libpqsrv_get_result(c->conn, bs_wait_event);

	if (res == NULL)
		c->busy = false;
	return res;
}

/* Read and discard what is left of the current statement's results. */
void
bs_conn_finish(BsConn *c)
{
	PGresult   *res;

	while (c->busy && (res = bs_conn_get_result(c)) != NULL)
		PQclear(res);
}

/*
 * Stop a statement whose results are no longer wanted (an error, or LIMIT reached): cancel it and
 * drain what was already sent. A connection that cannot be drained within a few seconds is
 * dropped rather than left in an unknown state.
 */
void
bs_conn_abandon(BsConn *c)
{
	TimestampTz deadline;
	const char *err;
	PGresult   *res;

	if (c->conn == NULL || !c->busy)
		return;
	deadline = TimestampTzPlusMilliseconds(GetCurrentTimestamp(), 5000);
	err = libpqsrv_cancel(c->conn, deadline);
	if (err != NULL)
	{
		elog(DEBUG1, "buildsmart: cancel on node %s failed: %s", c->name, err);
		bs_disconnect(c);
		return;
	}
	while (PQstatus(c->conn) == CONNECTION_OK)
	{
		/* libpq reads pending messages; the cancelled statement ends soon after */
		if (GetCurrentTimestamp() > deadline)
		{
			bs_disconnect(c);
			return;
		}
		res = libpqsrv_get_result(c->conn, bs_wait_event);
		if (res == NULL)
			break;
		PQclear(res);
	}
	c->busy = false;
	if (c->in_xact)
		c->xact_failed = true;	/* the cancelled statement aborted the remote transaction */
}

void
bs_report_remote_error(int elevel, PGresult *res, BsConn *c, const char *sql)
{
	char	   *sqlstate = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;
	char	   *primary = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_PRIMARY) : NULL;
	char	   *detail = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_DETAIL) : NULL;
	char	   *hint = res ? PQresultErrorField(res, PG_DIAG_MESSAGE_HINT) : NULL;
	char	   *context = res ? PQresultErrorField(res, PG_DIAG_CONTEXT) : NULL;
	int			code = ERRCODE_CONNECTION_FAILURE;
	char	   *msg;

	if (sqlstate)
		code = MAKE_SQLSTATE(sqlstate[0], sqlstate[1], sqlstate[2], sqlstate[3], sqlstate[4]);
	msg = primary ? pstrdup(primary) : (c->conn ? pchomp(PQerrorMessage(c->conn)) : pstrdup("connection lost"));
	detail = detail ? pstrdup(detail) : NULL;
	hint = hint ? pstrdup(hint) : NULL;
	context = context ? pstrdup(context) : NULL;
	if (res)
		PQclear(res);
	if (c->in_xact)
		c->xact_failed = true;
	if (c->conn != NULL && PQstatus(c->conn) != CONNECTION_OK)
		bs_disconnect(c);
	ereport(elevel,
			(errcode(code),
			 errmsg_internal("%s", msg),
			 detail ? errdetail_internal("%s", detail) : 0,
			 hint ? errhint("%s", hint) : 0,
			 context ? errcontext("%s", context) : 0,
			 errcontext("statement on node %s: %s", c->name, sql)));
}

static void
bs_end_remote_xacts(bool commit)
{
	HASH_SEQ_STATUS scan;
	BsConn	   *c;

	if (bs_conns == NULL)
		return;
	hash_seq_init(&scan, bs_conns);
	while ((c = hash_seq_search(&scan)) != NULL)
	{
		if (c->conn == NULL)
			continue;
		if (c->busy)
			bs_conn_abandon(c);
		if (c->conn == NULL)
			continue;
		if (c->in_xact)
		{
			PGresult   *res;
			bool		ok;

			if (commit && !c->xact_failed)
			{
				res = libpqsrv_exec(c->conn, "COMMIT", bs_wait_event);
				ok = PQresultStatus(res) == PGRES_COMMAND_OK;
				if (!ok)
				{
					c->in_xact = false;
					bs_report_remote_error(ERROR, res, c, "COMMIT");
				}
				PQclear(res);
			}
			else
			{
				/* errors cannot be raised while aborting: a connection that fails is dropped */
				res = PQexec(c->conn, "ROLLBACK");
				ok = PQresultStatus(res) == PGRES_COMMAND_OK;
				PQclear(res);
				c->synced = false;	/* SETs made in the transaction were rolled back */
				if (!ok)
				{
					bs_disconnect(c);
					continue;
				}
			}
			c->in_xact = false;
			c->xact_failed = false;
		}
	}
}

static void
bs_xact_callback(XactEvent event, void *arg)
{
	switch (event)
	{
		case XACT_EVENT_PRE_COMMIT:
		case XACT_EVENT_PARALLEL_PRE_COMMIT:
		case XACT_EVENT_PRE_PREPARE:
			/* remote transactions are read only: nothing to prepare, just end them */
			bs_end_remote_xacts(true);
			break;
		case XACT_EVENT_ABORT:
		case XACT_EVENT_PARALLEL_ABORT:
			bs_end_remote_xacts(false);
			break;
		default:
			break;
	}
	/* the transaction is over: its writes through postgres_fdw no longer matter */
	if (event == XACT_EVENT_COMMIT || event == XACT_EVENT_PARALLEL_COMMIT ||
		event == XACT_EVENT_ABORT || event == XACT_EVENT_PARALLEL_ABORT ||
		event == XACT_EVENT_PREPARE)
	{
		bs_xact_wrote_through_fdw = false;
		bs_exec_depth = 0;		/* an error skips ExecutorEnd */
	}
}

static void
bs_subxact_callback(SubXactEvent event, SubTransactionId mySubid,
					SubTransactionId parentSubid, void *arg)
{
	HASH_SEQ_STATUS scan;
	BsConn	   *c;

	if (event != SUBXACT_EVENT_ABORT_SUB || bs_conns == NULL)
		return;
	/* a statement interrupted inside a savepoint: stop what it left running */
	hash_seq_init(&scan, bs_conns);
	while ((c = hash_seq_search(&scan)) != NULL)
	{
		if (c->conn != NULL && c->busy)
			bs_conn_abandon(c);
	}
}

/*
 * A connection of its own for one stream (the COPY router): not cached, no statements kept, no
 * part in the transaction callbacks; the caller ends its remote transaction and closes it (closing
 * with a transaction open rolls it back). Same server and user mapping options, same checks.
 */
BsConn *
bs_open_private_conn(Oid serverid, const char *application_name)
{
	BsConn	   *c = palloc0(sizeof(BsConn));
	ForeignServer *server = GetForeignServer(serverid);
	UserMapping *um = GetUserMapping(GetUserId(), serverid);

	bs_ensure_hash();			/* registers the wait event */
	c->key.serverid = serverid;
	c->key.userid = GetUserId();
	strlcpy(c->name, server->servername, sizeof(c->name));
	bs_connect_appname = application_name;
	PG_TRY();
	{
		bs_connect(c, server, um);
	}
	PG_FINALLY();
	{
		bs_connect_appname = "buildsmart:pushdown";
	}
	PG_END_TRY();
	return c;
}

void
bs_close_private_conn(BsConn *c)
{
	if (c->conn != NULL)
		libpqsrv_disconnect(c->conn);
	c->conn = NULL;
	pfree(c);
}
