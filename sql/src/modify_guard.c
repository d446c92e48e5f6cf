/*
 * modify_guard.c: refuse UPDATE/DELETE plans that would identify fragment rows by ctid.
 *
 * Why: when postgres_fdw cannot send an UPDATE or DELETE to the worker as one statement (its
 * condition or new value uses something it does not ship, such as now(), random() or a
 * subquery), it fetches each row's ctid and then runs "DELETE FROM fragment WHERE ctid = $1".
 * A fragment is partitioned by time, and a ctid is only unique within one time partition: that
 * statement changes the row with the same ctid in every time partition of the fragment, silently
 * (measured: a DELETE meant for 3 rows removed 39). Until the extension runs such statements
 * itself, they are refused with what to do instead; statements postgres_fdw sends whole (direct
 * modification: every condition and value shippable) run as before.
 */
#include "buildsmart.h"

#include "catalog/partition.h"
#include "catalog/pg_class.h"
#include "nodes/bitmapset.h"
#include "parser/parsetree.h"
#include "utils/lsyscache.h"

static bool
bs_is_fragment(Oid relid)
{
	List	   *ancestors;
	bool		result;

	if (get_rel_relkind(relid) != RELKIND_FOREIGN_TABLE || !get_rel_relispartition(relid))
		return false;
	ancestors = get_partition_ancestors(relid);
	result = ancestors != NIL && bs_is_distributed(llast_oid(ancestors));
	list_free(ancestors);
	return result;
}

static void
bs_check_modify_table(PlannedStmt *stmt, ModifyTable *mt)
{
	ListCell   *lc;
	int			i = 0;

	if (mt->operation != CMD_UPDATE && mt->operation != CMD_DELETE)
		return;
	foreach(lc, mt->resultRelations)
	{
		RangeTblEntry *rte = rt_fetch(lfirst_int(lc), stmt->rtable);

		if (!bms_is_member(i, mt->fdwDirectModifyPlans) && bs_is_fragment(rte->relid))
			ereport(ERROR,
					(errcode(ERRCODE_FEATURE_NOT_SUPPORTED),
					 errmsg("this %s cannot run on the workers as one statement",
							mt->operation == CMD_UPDATE ? "UPDATE" : "DELETE"),
					 errdetail("Its condition or new values use something postgres_fdw does not send to a "
							   "worker (now(), random(), a subquery, a non-immutable function), so it would "
							   "identify rows by ctid, which is not unique across a fragment's time partitions."),
					 errhint("Compute such values first and write them as constants or parameters, e.g. "
							 "ts < '2024-01-01' instead of ts < now() - interval '1 year'.")));
		i++;
	}
}

void
bs_check_fragment_modify(PlannedStmt *stmt)
{
	ListCell   *lc;

	if (stmt->planTree != NULL && IsA(stmt->planTree, ModifyTable))
		bs_check_modify_table(stmt, (ModifyTable *) stmt->planTree);
	foreach(lc, stmt->subplans)
	{
		Plan	   *p = lfirst(lc);

		if (p != NULL && IsA(p, ModifyTable))
			bs_check_modify_table(stmt, (ModifyTable *) p);
	}
}
