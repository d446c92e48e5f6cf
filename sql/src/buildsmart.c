/*
 * buildsmart.c: module entry point and settings.
 *
 * The library is loaded into every session of a cluster database through
 * session_preload_libraries (set per database by the orchestrator), so no server restart and no
 * postgresql.conf change is needed to install or upgrade it; on workers the planner hook finds no
 * distributed table and steps aside.
 */
#include "buildsmart.h"

#include "utils/guc.h"

PG_MODULE_MAGIC_EXT(.name = "buildsmart", .version = "0.2");

bool		bs_enable_pushdown = true;
bool		bs_enable_skip_scan = true;
bool		bs_log_pushdown = false;

void		_PG_init(void);

void
_PG_init(void)
{
	DefineCustomBoolVariable("buildsmart.enable_pushdown",
							 "Runs queries on the distributed table on the workers when their shape allows.",
							 "Off: every query goes through postgres_fdw as planned by PostgreSQL.",
							 &bs_enable_pushdown, true, PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomBoolVariable("buildsmart.enable_skip_scan",
							 "Answers latest-per-meter DISTINCT ON queries with an index skip scan on each fragment.",
							 NULL, &bs_enable_skip_scan, true, PGC_USERSET, 0, NULL, NULL, NULL);
	DefineCustomBoolVariable("buildsmart.log_pushdown",
							 "Logs (at LOG) why a query on the distributed table was or was not pushed down.",
							 NULL, &bs_log_pushdown, false, PGC_SUSET, 0, NULL, NULL, NULL);
	DefineCustomBoolVariable("buildsmart.enable_copy_router",
							 "Streams COPY FROM STDIN into the distributed table to every fragment's worker at once.",
							 "Off: PostgreSQL's COPY routes rows through postgres_fdw batch inserts.",
							 &bs_enable_copy_router, true, PGC_USERSET, 0, NULL, NULL, NULL);
	MarkGUCPrefixReserved("buildsmart");

	bs_remote_init();
	bs_executor_init();
	bs_planner_init();
	bs_copy_router_init();
}
