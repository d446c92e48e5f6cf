/*
 * replace_trigger.c: latest value wins for plain INSERT and COPY into a fragment.
 *
 * buildsmart.replace_existing() is a BEFORE INSERT row trigger on every fragment table (PostgreSQL
 * clones it onto each time partition): before a row goes in, the stored row with the same
 * (building, meter, ts), if any, is deleted, so INSERT/COPY through the coordinator (postgres_fdw
 * batches) replace values instead of failing on the primary key.
 *
 * Why C: the trigger runs for every row of a COPY through the coordinator. The earlier PL/pgSQL
 * function per fragment deleted through the time-partitioned fragment, so every row paid for
 * run-time pruning over all its partitions (about 6.6 us a row). Here the DELETE targets the time
 * partition the row is going into (the trigger fires on it), with one prepared plan per partition
 * for the life of the session.
 */
#include "buildsmart.h"

#include "access/genam.h"
#include "access/htup_details.h"
#include "access/skey.h"
#include "access/stratnum.h"
#include "access/table.h"
#include "access/tableam.h"
#include "executor/tuptable.h"
#include "utils/snapmgr.h"
#include "catalog/pg_type.h"
#include "commands/trigger.h"
#include "executor/spi.h"
#include "lib/stringinfo.h"
#include "catalog/partition.h"
#include "miscadmin.h"
#include "utils/acl.h"
#include "utils/builtins.h"
#include "utils/hsearch.h"
#include "utils/inval.h"
#include "utils/lsyscache.h"
#include "utils/rel.h"

PG_FUNCTION_INFO_V1(bs_replace_existing);

typedef struct BsDeletePlan
{
	Oid			relid;
	SPIPlanPtr	plan;
	bool		stale;			/* the partition changed: prepare again */
	AttrNumber	attnos[3];		/* building, meter, ts in the partition */
	Oid			pkey;			/* its primary key index on (building, meter, ts) */
	Oid			parent;			/* the fragment table: privileges are checked there */
	Oid			checked_user;	/* who may delete through it (last check) */
	RegProcedure eqproc[3];
	Oid			collation[3];
} BsDeletePlan;

static HTAB *bs_delete_plans = NULL;
static bool bs_callback_registered = false;

/* A partition was altered or dropped (its OID could come back as another table): forget its plan. */
static void
bs_replace_relcache_callback(Datum arg, Oid relid)
{
	HASH_SEQ_STATUS scan;
	BsDeletePlan *p;

	if (bs_delete_plans == NULL)
		return;
	hash_seq_init(&scan, bs_delete_plans);
	while ((p = hash_seq_search(&scan)) != NULL)
		if (!OidIsValid(relid) || p->relid == relid)
			p->stale = true;
}

static BsDeletePlan *
bs_delete_plan_for(Relation rel)
{
	Oid			relid = RelationGetRelid(rel);
	BsDeletePlan *p;
	bool		found;

	if (!bs_callback_registered)
	{
		CacheRegisterRelcacheCallback(bs_replace_relcache_callback, (Datum) 0);
		bs_callback_registered = true;
	}
	if (bs_delete_plans == NULL)
	{
		HASHCTL		ctl;

		ctl.keysize = sizeof(Oid);
		ctl.entrysize = sizeof(BsDeletePlan);
		bs_delete_plans = hash_create("buildsmart replace plans", 64, &ctl, HASH_ELEM | HASH_BLOBS);
	}
	p = hash_search(bs_delete_plans, &relid, HASH_ENTER, &found);
	if (found && p->stale && p->plan != NULL)
	{
		SPI_freeplan(p->plan);
		p->plan = NULL;
	}
	if (!found || p->plan == NULL)
	{
		static const char *const cols[3] = {"building", "meter", "ts"};
		Oid			types[3];
		StringInfoData sql;
		int			i;

		p->plan = NULL;
		p->stale = false;
		for (i = 0; i < 3; i++)
		{
			p->attnos[i] = SPI_fnumber(RelationGetDescr(rel), cols[i]);
			if (p->attnos[i] <= 0)
				ereport(ERROR,
						(errcode(ERRCODE_UNDEFINED_COLUMN),
						 errmsg("buildsmart.replace_existing() needs column %s in %s", cols[i],
								RelationGetRelationName(rel))));
			types[i] = TupleDescAttr(RelationGetDescr(rel), p->attnos[i] - 1)->atttypid;
		}
		initStringInfo(&sql);
		/* operators qualified: the trigger must not run code found on a client's search_path */
		appendStringInfo(&sql,
						 "DELETE FROM %s WHERE building OPERATOR(pg_catalog.=) $1 "
						 "AND meter OPERATOR(pg_catalog.=) $2 AND ts OPERATOR(pg_catalog.=) $3",
						 quote_qualified_identifier(get_namespace_name(RelationGetNamespace(rel)),
													RelationGetRelationName(rel)));
		/* the primary key must be exactly (building, meter, ts): the probe below uses it */
		p->pkey = RelationGetPrimaryKeyIndex(rel, false);
		if (!OidIsValid(p->pkey))
			ereport(ERROR, (errmsg("buildsmart.replace_existing() needs a primary key on %s",
								   RelationGetRelationName(rel))));
		{
			Relation	idx = index_open(p->pkey, AccessShareLock);

			if (IndexRelationGetNumberOfKeyAttributes(idx) != 3)
				ereport(ERROR, (errmsg("the primary key of %s is not (building, meter, ts)",
									   RelationGetRelationName(rel))));
			for (i = 0; i < 3; i++)
			{
				Oid			op;

				if (idx->rd_index->indkey.values[i] != p->attnos[i])
					ereport(ERROR, (errmsg("the primary key of %s is not (building, meter, ts)",
										   RelationGetRelationName(rel))));
				op = get_opfamily_member(idx->rd_opfamily[i], idx->rd_opcintype[i], idx->rd_opcintype[i],
										 BTEqualStrategyNumber);
				p->eqproc[i] = get_opcode(op);
				p->collation[i] = idx->rd_indcollation[i];
			}
			index_close(idx, AccessShareLock);
		}
		p->parent = rel->rd_rel->relispartition ? get_partition_parent(relid, false) : relid;
		p->checked_user = InvalidOid;
		p->plan = SPI_prepare(sql.data, 3, types);
		if (p->plan == NULL)
			elog(ERROR, "buildsmart: SPI_prepare failed for %s: %s", sql.data, SPI_result_code_string(SPI_result));
		if (SPI_keepplan(p->plan) != 0)
			elog(ERROR, "buildsmart: SPI_keepplan failed");
		pfree(sql.data);
	}
	return p;
}

static bool
bs_key_exists(Relation rel, BsDeletePlan *p, Datum *values)
{
	Relation	idx = index_open(p->pkey, AccessShareLock);
	ScanKeyData keys[3];
	IndexScanDesc scan;
	TupleTableSlot *slot = table_slot_create(rel, NULL);
	bool		found;
	int			i;

	for (i = 0; i < 3; i++)
		ScanKeyEntryInitialize(&keys[i], 0, i + 1, BTEqualStrategyNumber, InvalidOid, p->collation[i],
							   p->eqproc[i], values[i]);
	scan = index_beginscan(rel, idx, SnapshotSelf, NULL, 3, 0);
	index_rescan(scan, keys, 3, NULL, 0);
	found = index_getnext_slot(scan, ForwardScanDirection, slot);
	index_endscan(scan);
	ExecDropSingleTupleTableSlot(slot);
	index_close(idx, AccessShareLock);
	return found;
}

Datum
bs_replace_existing(PG_FUNCTION_ARGS)
{
	TriggerData *td = (TriggerData *) fcinfo->context;
	Relation	rel;
	HeapTuple	row;
	BsDeletePlan *p;
	Datum		values[3];
	char		nulls[3];
	int			i;
	int			rc;

	if (!CALLED_AS_TRIGGER(fcinfo))
		ereport(ERROR, (errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
						errmsg("buildsmart.replace_existing() must be called as a trigger")));
	if (!TRIGGER_FIRED_BEFORE(td->tg_event) || !TRIGGER_FIRED_FOR_ROW(td->tg_event) ||
		!TRIGGER_FIRED_BY_INSERT(td->tg_event))
		ereport(ERROR, (errcode(ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED),
						errmsg("buildsmart.replace_existing() must fire BEFORE INSERT FOR EACH ROW")));
	rel = td->tg_relation;
	row = td->tg_trigtuple;

	/* the plan is made (inside SPI) the first time a partition is seen */
	if (bs_delete_plans == NULL || (p = hash_search(bs_delete_plans, &rel->rd_id, HASH_FIND, NULL)) == NULL ||
		p->plan == NULL || p->stale)
	{
		if (SPI_connect() != SPI_OK_CONNECT)
			elog(ERROR, "buildsmart: SPI_connect failed");
		p = bs_delete_plan_for(rel);
		SPI_finish();
	}
	for (i = 0; i < 3; i++)
	{
		bool		isnull;

		values[i] = heap_getattr(row, p->attnos[i], RelationGetDescr(rel), &isnull);
		nulls[i] = isnull ? 'n' : ' ';
		if (isnull)
			return PointerGetDatum(row);	/* NOT NULL refuses the row anyway */
	}

	/*
	 * Most readings are new: a probe of the primary key (committed rows and this transaction's
	 * own, earlier rows of the same COPY included) decides whether the DELETE has anything to do.
	 */
	if (!bs_key_exists(rel, p, values))
		return PointerGetDatum(row);

	/*
	 * Replacing is deleting: the inserting role needs DELETE on the fragment table, as with any
	 * DELETE through it. The statement itself targets the time partition (where roles hold no
	 * privileges of their own), so it runs as the table's owner once that check passed.
	 */
	{
		Oid			user = GetUserId();

		if (p->checked_user != user)
		{
			if (pg_class_aclcheck(p->parent, user, ACL_DELETE) != ACLCHECK_OK)
				aclcheck_error(ACLCHECK_NO_PRIV, OBJECT_TABLE, get_rel_name(p->parent));
			p->checked_user = user;
		}
	}
	if (SPI_connect() != SPI_OK_CONNECT)
		elog(ERROR, "buildsmart: SPI_connect failed");
	{
		Oid			save_user;
		int			save_sec;

		GetUserIdAndSecContext(&save_user, &save_sec);
		SetUserIdAndSecContext(rel->rd_rel->relowner,
							   save_sec | SECURITY_LOCAL_USERID_CHANGE | SECURITY_RESTRICTED_OPERATION);
		PG_TRY();
		{
			rc = SPI_execute_plan(p->plan, values, nulls, false, 0);
		}
		PG_FINALLY();
		{
			SetUserIdAndSecContext(save_user, save_sec);
		}
		PG_END_TRY();
	}
	if (rc != SPI_OK_DELETE)
		elog(ERROR, "buildsmart: replacing a reading failed: %s", SPI_result_code_string(rc));
	SPI_finish();
	return PointerGetDatum(row);
}
