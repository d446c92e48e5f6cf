"""Device metadata: Haystack/Brick import into ``public.devices`` and its MongoDB mirror."""
