"""``--set`` overrides that shrink the embedded benchmark of a shipped config to smoke size (data.embedded)."""

from data.embedded import SMOKE_COUNTS

#: Flat ``--set`` arguments for ``core.Main.main``: ``main([..., *SMOKE_DATA])``.
SMOKE_DATA = tuple(arg for key, value in SMOKE_COUNTS.items()
                   for arg in ("--set", f"data.params.prepare.params.{key}={value}"))
#: The same as ``load_config`` overrides.
SMOKE_OVERRIDES = tuple(SMOKE_DATA[1::2])
