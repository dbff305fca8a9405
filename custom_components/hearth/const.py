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

# Household-wide assistant settings (stored in a Store, not in entry options).
CONF_PROMPT: Final = "prompt"
CONF_LLM_HASS_API: Final = "llm_hass_api"
CONF_PREFER_LOCAL_INTENTS: Final = "prefer_local_intents"
CONF_MAX_TOKENS: Final = "max_tokens"
CONF_TEMPERATURE: Final = "temperature"
CONF_CHAT_MODEL: Final = "chat_model"

DEFAULT_MAX_TOKENS: Final = 256
DEFAULT_TEMPERATURE: Final = 0.0
MAX_TOOL_ITERATIONS: Final = 5

SCAN_INTERVAL: Final = timedelta(seconds=10)
MAX_SCAN_INTERVAL: Final = timedelta(seconds=60)
UNREACHABLE_ISSUE_AFTER: Final = timedelta(minutes=5)

STORAGE_KEY: Final = "hearth.settings"
STORAGE_VERSION: Final = 1

CONVERSATION_UNIQUE_ID: Final = "household_conversation"
AI_TASK_UNIQUE_ID: Final = "household_ai_task"
HOUSEHOLD_DEVICE_ID: Final = "household"

SERVICE_ASK: Final = "ask"
