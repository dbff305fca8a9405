"""The household's one Hearth conversation agent."""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any, Final, Literal

from homeassistant.components import conversation
from homeassistant.const import MATCH_ALL
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import intent
from homeassistant.helpers.entity_platform import AddEntitiesCallback

from .assistant import (
    HOUSEHOLD_DEVICE,
    async_error_text,
    async_provide_llm_data,
    async_run_chat_log,
)
from .cluster import Cluster, MessageTooLongError
from .const import CONF_LLM_HASS_API, CONF_PREFER_LOCAL_INTENTS, CONVERSATION_UNIQUE_ID, LOGGER

if TYPE_CHECKING:
    from . import HearthConfigEntry

PARALLEL_UPDATES = 0

# Home Assistant's sentence matcher takes time that grows about with the square of
# the text's length and holds the event loop meanwhile (4,000 characters: 17 s);
# spoken and typed commands are short, so longer text goes straight to a worker.
MAX_LOCAL_INTENT_CHARS: Final = 250


async def async_setup_entry(
    hass: HomeAssistant,
    entry: HearthConfigEntry,
    async_add_entities: AddEntitiesCallback,
) -> None:
    """The household's primary entry holds the agent; another takes it over later."""
    cluster = Cluster.get(hass)
    cluster.add_household_entities(
        entry.entry_id, lambda: async_add_entities([HearthConversationEntity(cluster)])
    )


class HearthConversationEntity(conversation.ConversationEntity):
    """Answers with whichever worker the router picks."""

    _attr_has_entity_name = True
    _attr_name = None
    _attr_unique_id = CONVERSATION_UNIQUE_ID
    _attr_device_info = HOUSEHOLD_DEVICE
    _attr_supports_streaming = True  # read by Home Assistant 2025.6 and later

    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster

    @property
    def supported_languages(self) -> list[str] | Literal["*"]:
        return MATCH_ALL

    @property
    def supported_features(self) -> conversation.ConversationEntityFeature:
        if self.cluster.settings.get(CONF_LLM_HASS_API):
            return conversation.ConversationEntityFeature.CONTROL
        return conversation.ConversationEntityFeature(0)

    async def _async_handle_message(
        self,
        user_input: conversation.ConversationInput,
        chat_log: conversation.ChatLog,
    ) -> conversation.ConversationResult:
        settings = self.cluster.settings
        message = user_input.text
        if len(message) > (limit := self.cluster.prompt_char_limit()):
            # Longer than any household model could read: refused before anything
            # (sentence matching, preference relevance, a worker) spends time on it.
            return await self._async_error(
                user_input, chat_log, MessageTooLongError(len(message), limit)
            )
        if (
            settings.get(CONF_PREFER_LOCAL_INTENTS)
            and len(message.strip()) <= MAX_LOCAL_INTENT_CHARS
            and (local := await self._async_try_local_intents(user_input, chat_log))
        ):
            return conversation.ConversationResult(
                response=local, conversation_id=chat_log.conversation_id
            )
        try:
            await async_provide_llm_data(chat_log, user_input, settings)
        except conversation.ConverseError as err:
            return err.as_conversation_result()
        try:
            await async_run_chat_log(
                self.hass,
                self.cluster,
                chat_log,
                user_input.agent_id,
                language=user_input.language,  # a cut-off answer ends with a note
            )
        except HomeAssistantError as err:
            return await self._async_error(user_input, chat_log, err)
        response = intent.IntentResponse(language=user_input.language)
        last = chat_log.content[-1]
        text = last.content if isinstance(last, conversation.AssistantContent) else None
        response.async_set_speech(text or "")
        return conversation.ConversationResult(
            response=response,
            conversation_id=chat_log.conversation_id,
            continue_conversation=chat_log.continue_conversation,
        )

    async def _async_error(
        self,
        user_input: conversation.ConversationInput,
        chat_log: conversation.ChatLog,
        err: HomeAssistantError,
    ) -> conversation.ConversationResult:
        """A translated error answer (no traceback: the reason is the answer).

        Nothing is added to the chat log, so Home Assistant keeps the message out
        of the conversation's history and the next turn is not refused with it.
        """
        LOGGER.info("No answer to a %d-character message: %s", len(user_input.text), err)
        response = intent.IntentResponse(language=user_input.language)
        response.async_set_error(
            intent.IntentResponseErrorCode.UNKNOWN,
            await async_error_text(self.hass, user_input.language, err),
        )
        return conversation.ConversationResult(
            response=response, conversation_id=chat_log.conversation_id
        )

    async def _async_try_local_intents(
        self, user_input: conversation.ConversationInput, chat_log: conversation.ChatLog
    ) -> intent.IntentResponse | None:
        """Let Home Assistant's own sentence matching handle plain commands first.

        Home Assistant 2025.4 has `async_handle_intents(hass, user_input)`; newer
        versions take the chat log too and record the answer in it themselves.
        """
        handle: Any = getattr(conversation, "async_handle_intents", None)
        if handle is None:
            return None
        takes_chat_log = "chat_log" in inspect.signature(handle).parameters
        try:
            if takes_chat_log:
                response: intent.IntentResponse | None = await handle(
                    self.hass, user_input, chat_log
                )
            else:
                response = await handle(self.hass, user_input)
        except HomeAssistantError as err:
            LOGGER.debug("Local intents could not handle %r: %s", user_input.text, err)
            return None
        if response is not None and not takes_chat_log:
            speech = response.speech.get("plain", {}).get("speech", "")
            chat_log.async_add_assistant_content_without_tools(
                conversation.AssistantContent(agent_id=user_input.agent_id, content=speech)
            )
        return response
