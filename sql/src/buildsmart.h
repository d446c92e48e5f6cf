/*
 * buildsmart.h: the C part of the buildsmart extension.
 *
 * Why C at all: postgres_fdw plans each foreign partition on its own and ships only what it can
 * prove safe one partition at a time. It never ships DISTINCT ON, ORDER BY ... LIMIT through a
 * partitioned parent, date_trunc()/AT TIME ZONE with a constant zone, or aggregates that it would
 * have to finish per partition, so the everyday dashboard queries pulled every row to the
 * coordinator. The distributed planner here recognises a SELECT over the distributed table as a
 * whole, sends the query itself to the workers (one statement per worker, all workers at once,
 * without a cursor so workers may use parallel query), and only merges on the coordinator.
 *
 * Modules:
 *   buildsmart.c      _PG_init, settings, hook chaining
 *   dist_planner.c    which queries can run on the workers, and the plan that runs them
 *   dist_deparse.c    shippability rules and the SQL each worker receives
 *   dist_executor.c   the custom scan: pruning, dispatch, merge, LIMIT, fallback, EXPLAIN
 *   dist_combine.c    aggregates not keyed by building, in two phases
 *   dist_join.c       joins with buildings prune fragments by the buildings filter
 *   remote.c          connections to workers: settings, transactions, cancel, errors
 *   replace_trigger.c latest-wins row trigger of fragments (writes through the coordinator)
 *   copy_router.c     COPY FROM STDIN into the distributed table, streamed to every fragment
 *   modify_guard.c    refuses UPDATE/DELETE that postgres_fdw would run by ctid on a fragment
 */
#ifndef BUILDSMART_H
#define BUILDSMART_H

#include "postgres.h"

#include "fmgr.h"
#include "libpq-fe.h"
#include "nodes/execnodes.h"
#include "nodes/extensible.h"
#include "nodes/parsenodes.h"
#include "nodes/plannodes.h"
#include "utils/palloc.h"
#include "utils/timestamp.h"

/* settings (buildsmart.c) */
extern bool bs_enable_pushdown;
extern bool bs_enable_skip_scan;
extern bool bs_log_pushdown;

/* planner (dist_planner.c) */
extern void bs_planner_init(void);
extern bool bs_planning_fallback;

/* how the results of several fragments combine */
typedef enum BsShape
{
	BS_SHAPE_ROWS = 1,			/* rows are independent: any set of fragments, concatenated */
	BS_SHAPE_BUILDING = 2,		/* groups/distinct/windows keyed by building: concatenated */
	BS_SHAPE_SINGLE = 3			/* anything else: only when one fragment remains */
} BsShape;

/*
 * Positions in CustomScan.custom_private. Everything the executor needs is plain node data so a
 * cached plan can be copied.
 */
enum
{
	BS_PRIV_QUERY = 0,			/* Query: the original, planned by PostgreSQL in fallback mode */
	BS_PRIV_FRAG_OIDS,			/* OID list: candidate fragments (coordinator foreign tables) */
	BS_PRIV_FRAG_SQL,			/* List of String: the statement for each fragment */
	BS_PRIV_FRAG_LOWER,			/* List of Const (text, NULL = unbounded): building lower bounds */
	BS_PRIV_FRAG_UPPER,			/* List of Const: upper bounds (exclusive) */
	BS_PRIV_INTS,				/* Integer list, see BS_INT_* */
	BS_PRIV_SORT_ATTNO,			/* Integer list: output column of each sort key */
	BS_PRIV_SORT_OP,			/* OID list */
	BS_PRIV_SORT_COLL,			/* OID list */
	BS_PRIV_SORT_NULLSFIRST,	/* Integer list */
	BS_PRIV_PRUNE_KIND,			/* Integer list: BS_PRUNE_* of each pruning expression */
	BS_PRIV_NOTE,				/* String: how the planner read the query (EXPLAIN) */
	BS_PRIV_FRAG_TS_LOWER,		/* List of Const (timestamptz, NULL): time range of a time piece */
	BS_PRIV_FRAG_TS_UPPER,
	BS_PRIV_COUNT
};

enum
{
	BS_INT_SHAPE = 0,
	BS_INT_NPARAMS,				/* worker parameters: the first custom_exprs */
	BS_INT_NPRUNE,				/* pruning expressions: the next custom_exprs */
	BS_INT_HAS_LIMIT,			/* limitCount and limitOffset follow them in custom_exprs */
	BS_INT_LIMIT_PARAM,			/* worker parameter number of LIMIT count+offset, or 0 */
	BS_INT_BINARY,				/* results in binary format */
	BS_INT_CURSOR_OPTIONS,
	BS_INT_SKIP_SCAN,
	BS_INT_LEAF,				/* partial query under a combine plan: rows only, child = fallback */
	BS_INT_INSERT,				/* an INSERT routed to one fragment */
	BS_INT_REDISTINCT,			/* DISTINCT ON again on the coordinator over this many sort keys */
	BS_INT_MERGE,				/* a node's fragments may be read as one FROM item (one statement) */
	BS_INT_COUNT
};

typedef enum BsPruneKind
{
	BS_PRUNE_EQ = 1,			/* building = value */
	BS_PRUNE_ANY = 2,			/* building = ANY(array) */
	BS_PRUNE_TS_LT = 3,			/* ts < value: time pieces of a building split by time */
	BS_PRUNE_TS_LE = 4,
	BS_PRUNE_TS_EQ = 5,
	BS_PRUNE_TS_GE = 6,
	BS_PRUNE_TS_GT = 7,
	BS_PRUNE_B_LT = 8,			/* building < value (C order): building ranges below it */
	BS_PRUNE_B_LE = 9,
	BS_PRUNE_B_GE = 10,
	BS_PRUNE_B_GT = 11
} BsPruneKind;

#define BS_PRUNE_IS_TS(k) ((k) >= BS_PRUNE_TS_LT && (k) <= BS_PRUNE_TS_GT)
#define BS_PRUNE_IS_RANGE(k) ((k) >= BS_PRUNE_B_LT && (k) <= BS_PRUNE_B_GT)

extern bool bs_time_may_hold(Const *lo, Const *hi, int kind, TimestampTz v);
extern bool bs_range_may_hold(Const *lo, Const *hi, int kind, Datum v);
extern bool bs_is_distributed(Oid relid);

/* two-phase aggregates (dist_combine.c) */
typedef struct BsCombine
{
	Query	   *query;			/* the combine query, over subquery "bs_partial" */
	char	   *sql;
} BsCombine;
extern BsCombine *bs_build_combine(Query *parse, Oid dist, Index dist_rti, Index group_rti,
								   const char **reason);

/* joins with buildings (dist_join.c) */
extern bool bs_add_join_pruning(Query *parse, Oid dist);

/* executor (dist_executor.c) */
extern void bs_executor_init(void);
extern CustomScan *bs_make_custom_scan(List *tlist, List *custom_exprs, List *custom_private);
extern bool bs_xact_wrote_through_fdw;
extern int	bs_exec_depth;

/* deparse (dist_deparse.c) */
typedef struct BsShipContext
{
	Index		dist_rti;		/* range table index of the distributed table */
	Index		group_rti;		/* of the RTE_GROUP entry, or 0 */
	List	   *param_exprs;	/* expressions the coordinator evaluates, in worker $n order */
	bool		allow_exec_params;	/* values of InitPlans may be evaluated on the coordinator */
	const char *reason;			/* why not, when not shippable */
} BsShipContext;

extern bool bs_expr_shippable(Node *node, BsShipContext *ctx);
extern Node *bs_extract_params(Node *node, BsShipContext *ctx);
extern char *bs_deparse_query(Query *query);
extern char *bs_deparse_skip_scan(Query *query, Oid fragment, const char *qualified_name,
								  bool ts_desc, int limit_param);
extern char *bs_deparse_latest_n(Query *query, Oid fragment, const char *qualified_name,
								 const char *limit_text);
extern void bs_set_transmission_modes(int *nestlevel);
extern void bs_reset_transmission_modes(int nestlevel);
extern bool bs_type_is_builtin(Oid typid);

/* remote (remote.c) */
typedef struct BsConn BsConn;
extern void bs_remote_init(void);
extern BsConn *bs_get_conn(Oid serverid, bool *in_xact_mode);
extern PGconn *bs_conn_pg(BsConn *c);
extern const char *bs_conn_name(BsConn *c);
extern void bs_conn_send(BsConn *c, const char *sql, int nparams, const Oid *types,
						 const char *const *values, const int *lengths, const int *formats,
						 int result_format);
extern PGresult *bs_conn_get_result(BsConn *c);
extern void bs_conn_finish(BsConn *c);
extern void bs_conn_abandon(BsConn *c);
extern void bs_report_remote_error(int elevel, PGresult *res, BsConn *c, const char *sql);
extern BsConn *bs_open_private_conn(Oid serverid, const char *application_name);
extern void bs_close_private_conn(BsConn *c);

/* where a row goes (dist_planner.c), for the COPY router (copy_router.c) */
typedef struct BsRoute
{
	Oid			relid;			/* coordinator foreign table */
	char	   *qualified_name; /* the same table on its worker */
	Const	   *lower;			/* building range [lower, upper); NULL constvalue = open */
	Const	   *upper;
	bool		time_piece;		/* part of a building split by time */
	Const	   *ts_lower;		/* its time range */
	Const	   *ts_upper;
} BsRoute;
extern List *bs_routing_fragments(Oid dist);
extern bool bs_building_in_range(Const *lower, Const *upper, Datum building);

/* UPDATE/DELETE that postgres_fdw would run by ctid (modify_guard.c) */
extern void bs_check_fragment_modify(PlannedStmt *stmt);

/* COPY router (copy_router.c) */
extern bool bs_enable_copy_router;
extern void bs_copy_router_init(void);

#endif							/* BUILDSMART_H */
