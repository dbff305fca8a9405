"""Constants for the Hearth integration."""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Final

DOMAIN: Final = "hearth"
LOGGER = logging.getLogger(__package__)

DEFAULT_PORT: Final = 8765
CLIENT_NAME: Final = "Home Assistant"

CONF_NODE_ID: Final = "node_id"
CONF_TOKEN_ID: Final = "token_id"  # noqa: S105 - a key, not a secret
CONF_CODE: Final = "code"
# Transport (entry data): the pinned certificate, and the two explicit opt-outs.
CONF_FINGERPRINT: Final = "fingerprint"  # hex SHA-256 of the worker's certificate
CONF_PLAIN_HTTP: Final = "plain_http"
CONF_ALLOW_PUBLIC: Final = "allow_public_address"
# A worker the Hearth add-on runs (on the Home Assistant host): the add-on's slug, as
# the Supervisor names it in its discovery (config_flow.py).
CONF_ADDON: Final = "addon"

# Household-wide assistant settings (stored in a Store, not in entry options).
CONF_PROMPT: Final = "prompt"
CONF_LLM_HASS_API: Final = "llm_hass_api"
CONF_MAX_TOKENS: Final = "max_tokens"
CONF_TEMPERATURE: Final = "temperature"
CONF_CHAT_MODEL: Final = "chat_model"
CONF_EMBEDDING_MODEL: Final = "embedding_model"
# Settings Hearth no longer has, dropped where stored ones are read. "Prefer handling
# commands locally" is Home Assistant's own pipeline setting (off by default).
REMOVED_SETTINGS: Final = frozenset({"prefer_local_intents"})

# Per-worker routing flags (options of that worker's config entry).
CONF_ONLY_WHEN_IDLE: Final = "only_when_idle"
CONF_NOT_ON_BATTERY: Final = "not_on_battery"

DEFAULT_MAX_TOKENS: Final = 256
# None: send no temperature, so the worker uses the model's own generation_config.json.
DEFAULT_TEMPERATURE: Final[float | None] = None
MAX_TOOL_ITERATIONS: Final = 5
# Conversations whose per-turn notes are remembered, so that a later turn sends
# its earlier turns exactly as they were sent (a prefix the worker has cached).
MAX_REMEMBERED_CONVERSATIONS: Final = 256

# Said in the household's system prompt whenever device tools are offered.
DEVICES_ONLY_THROUGH_TOOLS_PROMPT: Final = (
    "Devices change only when you call a tool: to control a device, call the tool, "
    "and never say a device changed unless a tool call changed it."
)

# Every wait on a worker is bounded (seconds); see "Failure handling" in docs/ARCHITECTURE.md.
CONNECT_TIMEOUT: Final = 5.0  # TCP connect, any request
REQUEST_TIMEOUT: Final = 10.0  # a whole non-streamed request (info, capacity, pairing)
FIRST_TOKEN_TIMEOUT: Final = 60.0  # chat: request sent -> first text or tool call (queue, prefill)
BETWEEN_TOKENS_TIMEOUT: Final = 30.0  # chat: silence between two stream events
STREAM_TOTAL_TIMEOUT: Final = 600.0  # chat: request sent -> the answer's last token

SCAN_INTERVAL: Final = timedelta(seconds=10)
# A request finding no worker online polls the offline ones first, waiting at most this.
REPOLL_TIMEOUT: Final = CONNECT_TIMEOUT
# Removing a worker's entry revokes its token there, waiting at most this (best effort).
REVOKE_TIMEOUT: Final = CONNECT_TIMEOUT
MAX_SCAN_INTERVAL: Final = timedelta(seconds=60)
UNREACHABLE_ISSUE_AFTER: Final = timedelta(minutes=5)

# The household settings' file under .storage (never rename: households' settings are there).
SETTINGS_STORAGE_KEY: Final = "hearth.settings"
STORAGE_VERSION: Final = 1

CONVERSATION_UNIQUE_ID: Final = "household_conversation"
AI_TASK_UNIQUE_ID: Final = "household_ai_task"
STT_UNIQUE_ID: Final = "household_stt"
TTS_UNIQUE_ID: Final = "household_tts"
HOUSEHOLD_DEVICE_ID: Final = "household"
# The LLM API of Hearth's agent (preference_tools.HouseholdAPI); not offered as a choice.
HOUSEHOLD_API_ID: Final = f"{DOMAIN}_household"

SERVICE_ASK: Final = "ask"
