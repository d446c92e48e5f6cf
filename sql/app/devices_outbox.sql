-- Transactional outbox of public.devices for the MongoDB mirror (orchestrator/metadata/mirror.py).
-- Idempotent: applied by orchestrator.metadata.outbox.ensure_outbox() whenever its hash changes.
-- Every committed insert/update/delete of a device leaves one row here in the same transaction;
-- the mirror applies rows in seq order and deletes them once MongoDB has them.
CREATE SCHEMA IF NOT EXISTS bsmirror;

CREATE TABLE IF NOT EXISTS bsmirror.outbox (
    seq        bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    xid        xid8 NOT NULL DEFAULT pg_current_xact_id(),
    entity_id  text NOT NULL,
    op         text NOT NULL CHECK (op IN ('upsert', 'delete', 'truncate')),
    doc        jsonb,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
COMMENT ON TABLE bsmirror.outbox IS 'Device changes not yet in MongoDB, in seq order; deleted once applied';

-- One row per mirrored table: progress for lag reporting, and an epoch that names this outbox in
-- the MongoDB checkpoint (so a mirror pointed at another cluster never trusts a foreign checkpoint).
CREATE TABLE IF NOT EXISTS bsmirror.state (
    name            text PRIMARY KEY,
    epoch           uuid NOT NULL DEFAULT gen_random_uuid(),
    applied_events  bigint NOT NULL DEFAULT 0,
    last_seq        bigint,
    last_applied_at timestamptz
);
INSERT INTO bsmirror.state (name) VALUES ('devices') ON CONFLICT (name) DO NOTHING;

CREATE TABLE IF NOT EXISTS bsmirror.meta (
    key   text PRIMARY KEY,
    value text NOT NULL
);

-- The document image of a device (its MongoDB document without _id). One definition for the
-- trigger, verify and repair.
CREATE OR REPLACE FUNCTION bsmirror.device_doc(building text, kind text, metadata jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$ SELECT jsonb_build_object('building', building, 'kind', kind, 'metadata', metadata) $$;

-- SECURITY DEFINER: the application role writes devices but needs no rights on the outbox.
CREATE OR REPLACE FUNCTION bsmirror.capture_devices() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO bsmirror.outbox (entity_id, op) VALUES ('', 'truncate');
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO bsmirror.outbox (entity_id, op) VALUES (OLD.id, 'delete');
    ELSE
        IF TG_OP = 'UPDATE' AND OLD.id IS DISTINCT FROM NEW.id THEN
            INSERT INTO bsmirror.outbox (entity_id, op) VALUES (OLD.id, 'delete');
        END IF;
        INSERT INTO bsmirror.outbox (entity_id, op, doc)
        VALUES (NEW.id, 'upsert', bsmirror.device_doc(NEW.building, NEW.kind, NEW.metadata));
    END IF;
    RETURN NULL;
END
$$;

-- One notification per statement (not per row) wakes a LISTENing mirror at commit.
CREATE OR REPLACE FUNCTION bsmirror.notify_devices() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pg_notify('bsmirror_devices', '');
    RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER devices_outbox_insdel
    AFTER INSERT OR DELETE ON public.devices
    FOR EACH ROW EXECUTE FUNCTION bsmirror.capture_devices();
-- Updates that change nothing (e.g. a re-import of the same tags) leave no event.
CREATE OR REPLACE TRIGGER devices_outbox_upd
    AFTER UPDATE ON public.devices
    FOR EACH ROW
    WHEN ((OLD.id, OLD.building, OLD.kind, OLD.metadata) IS DISTINCT FROM (NEW.id, NEW.building, NEW.kind, NEW.metadata))
    EXECUTE FUNCTION bsmirror.capture_devices();
CREATE OR REPLACE TRIGGER devices_outbox_trunc
    AFTER TRUNCATE ON public.devices
    FOR EACH STATEMENT EXECUTE FUNCTION bsmirror.capture_devices();
CREATE OR REPLACE TRIGGER devices_outbox_notify
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON public.devices
    FOR EACH STATEMENT EXECUTE FUNCTION bsmirror.notify_devices();
