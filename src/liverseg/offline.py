"""Nothing phones home or waits on the network: telemetry and update checks off.

Set as defaults (a user's explicit setting wins), before the libraries are imported.
"""

import os

TELEMETRY_OFF = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "False",
    "NO_ALBUMENTATIONS_UPDATE": "1",
    "DAGSTER_DISABLE_TELEMETRY": "1",
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
}


def disable_telemetry() -> None:
    for var, value in TELEMETRY_OFF.items():
        os.environ.setdefault(var, value)
