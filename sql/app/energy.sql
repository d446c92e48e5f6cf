-- Energy model on the coordinator (issue 14), outside the extension like readings: idempotent,
-- applied by setup (`up`, `init`, `upgrade`) on new and existing clusters.
--
-- buildings and meters are metadata edited here (SQL, `buildsmart buildings|meters import`,
-- `devices import`) and copied to every worker under the same names (public.buildings, ...),
-- where the rollups read them, by orchestrator/energy/reference.py.
ALTER TABLE public.buildings ADD COLUMN IF NOT EXISTS name text;
ALTER TABLE public.buildings ADD COLUMN IF NOT EXISTS site text;
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_constraint
                    WHERE conrelid = 'public.buildings'::regclass AND conname = 'buildings_time_zone_known') THEN
        ALTER TABLE public.buildings ADD CONSTRAINT buildings_time_zone_known CHECK (buildsmart.is_zone(time_zone));
    END IF;
END;
$$;

-- A meter of a building. Readings of a meter that has no row here get the defaults of the
-- columns: an electricity meter in kWh, interval readings, multiplier 1, a reading an hour.
-- unit: the canonical unit its readings are stored in (ingest converts to it);
-- register_max: a cumulative register wraps to 0 on reaching it; calorific_value: kWh per m³
-- (gas), for conversions between volume and energy.
CREATE TABLE IF NOT EXISTS public.meters (
    building          text COLLATE "C" NOT NULL,
    meter             text NOT NULL,
    kind              text NOT NULL DEFAULT 'electricity'
                      CHECK (kind IN ('electricity', 'gas', 'water', 'heat', 'cooling', 'steam', 'oil', 'other')),
    unit              text NOT NULL DEFAULT 'kWh',
    reading_type      text NOT NULL DEFAULT 'interval' CHECK (reading_type IN ('interval', 'cumulative')),
    multiplier        double precision NOT NULL DEFAULT 1 CHECK (multiplier > 0),
    register_max      double precision CHECK (register_max > 0),
    calorific_value   double precision CHECK (calorific_value > 0),
    expected_interval interval NOT NULL DEFAULT '1 hour' CHECK (expected_interval > interval '0'),
    attributes        jsonb NOT NULL DEFAULT '{}'::jsonb,
    PRIMARY KEY (building, meter)
);

-- A register replaced at ts: readings at or after ts come from the new register, which started
-- at new_initial; the old one ended at old_final (NULL: at its last reading).
CREATE TABLE IF NOT EXISTS public.meter_replacements (
    building    text COLLATE "C" NOT NULL,
    meter       text NOT NULL,
    ts          timestamptz NOT NULL,
    old_final   double precision,
    new_initial double precision NOT NULL DEFAULT 0,
    note        text,
    PRIMARY KEY (building, meter, ts)
);

CREATE OR REPLACE TRIGGER reference_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON public.buildings
    FOR EACH STATEMENT EXECUTE FUNCTION buildsmart.bump_reference_version();
CREATE OR REPLACE TRIGGER reference_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON public.meters
    FOR EACH STATEMENT EXECUTE FUNCTION buildsmart.bump_reference_version();
CREATE OR REPLACE TRIGGER reference_changed AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON public.meter_replacements
    FOR EACH STATEMENT EXECUTE FUNCTION buildsmart.bump_reference_version();

-- Rollups, distributed like readings (same building ranges and nodes; foreign partitions
-- bsdata.<shard>_hourly / _daily over tables next to each fragment). Maintained by the system:
-- read them, never write them. kwh is the consumption in the meter's unit (sum over the bucket),
-- readings/expected/completeness the readings received against those the meter should send.
CREATE TABLE IF NOT EXISTS public.readings_hourly (
    building     text COLLATE "C" NOT NULL,
    meter        text NOT NULL,
    ts           timestamptz NOT NULL,          -- start of the UTC hour
    kwh          double precision,
    kwh_min      double precision,
    kwh_max      double precision,
    readings     integer NOT NULL,
    expected     integer,
    completeness double precision
) PARTITION BY RANGE (building);

CREATE TABLE IF NOT EXISTS public.readings_daily (
    building       text COLLATE "C" NOT NULL,
    meter          text NOT NULL,
    ts             timestamptz NOT NULL,        -- local midnight of the building's day
    day            date NOT NULL,               -- the local date
    month          date NOT NULL,               -- first day of its local month
    kwh            double precision,
    kwh_min        double precision,
    kwh_max        double precision,
    readings       integer NOT NULL,
    expected       integer,                     -- 23, 24 or 25 hourly readings on DST days
    completeness   double precision,
    month_expected integer                      -- readings expected in the whole local month
) PARTITION BY RANGE (building);

-- Local months from the daily rollups; GROUP BY building runs on the workers, per fragment.
CREATE OR REPLACE VIEW public.readings_monthly AS
SELECT building, meter, month,
       sum(kwh) AS kwh, min(kwh_min) AS kwh_min, max(kwh_max) AS kwh_max,
       sum(readings)::bigint AS readings, max(month_expected) AS expected,
       sum(readings)::double precision / nullif(max(month_expected), 0) AS completeness,
       count(DISTINCT day) AS days
  FROM public.readings_daily
 GROUP BY building, meter, month;
