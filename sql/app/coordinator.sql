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

-- Latest reading of every meter. The max(ts) per (building, meter) runs on the workers (one
-- remote GROUP BY per fragment); only the few matching rows are fetched back.
CREATE OR REPLACE VIEW public.latest_readings AS
WITH latest AS (
    SELECT building, meter, max(ts) AS ts FROM public.readings GROUP BY building, meter
)
SELECT r.building, r.meter, r.ts, r.kwh
  FROM latest l
  JOIN public.readings r ON r.building = l.building AND r.meter = l.meter AND r.ts = l.ts;
