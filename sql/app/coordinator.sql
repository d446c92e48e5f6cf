-- Application tables on the coordinator (outside the extension, so migrations own them).
-- readings is partitioned by building range; each partition is a postgres_fdw foreign table
-- (bsdata.readings_f<N>) over a time-partitioned fragment table on a worker.
CREATE SCHEMA IF NOT EXISTS bsdata;

CREATE TABLE IF NOT EXISTS public.readings (
    building text COLLATE "C" NOT NULL,
    meter    text NOT NULL,
    ts       timestamptz NOT NULL,
    kwh      double precision NOT NULL
) PARTITION BY RANGE (building);
COMMENT ON TABLE public.readings IS
    'Energy readings; (building, meter, ts) is unique and the latest value wins. Fragments: buildsmart.fragments';

CREATE TABLE IF NOT EXISTS public.buildings (
    code          text COLLATE "C" PRIMARY KEY,
    floor_area_m2 double precision,
    floors        integer,
    time_zone     text NOT NULL DEFAULT 'UTC',
    attributes    jsonb NOT NULL DEFAULT '{}'::jsonb
);

CREATE TABLE IF NOT EXISTS public.devices (
    id         text PRIMARY KEY,
    building   text COLLATE "C",
    kind       text,
    metadata   jsonb NOT NULL DEFAULT '{}'::jsonb,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS devices_building_idx ON public.devices (building);
CREATE INDEX IF NOT EXISTS devices_metadata_idx ON public.devices USING gin (metadata jsonb_path_ops);

-- Latest reading of every meter; buildsmart.latest_readings('b2') answers one building fast.
CREATE OR REPLACE VIEW public.latest_readings AS
SELECT building, meter, ts, kwh FROM buildsmart.latest_readings();
