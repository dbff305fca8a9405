"""The household's one Hearth conversation agent."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from homeassistant.components import conversation
from homeassistant.const import MATCH_ALL
from homeassistant.core import HomeAssistant
from homeassistant.exceptions import HomeAssistantError
from homeassistant.helpers import intent
from homeassistant.helpers.entity_platform import AddEntitiesCallback

from .assistant import async_error_text, async_provide_llm_data
from .const import CONF_LLM_HASS_API, CONVERSATION_UNIQUE_ID, LOGGER
from .entity import HearthBaseLLMEntity, async_add_household_entity
from .household import MessageTooLongError

if TYPE_CHECKING:
    from . import HearthConfigEntry

PARALLEL_UPDATES = 0


async def async_setup_entry(
    hass: HomeAssistant,
    entry: HearthConfigEntry,
    async_add_entities: AddEntitiesCallback,
) -> None:
    """The household's primary entry holds the agent; another takes it over later."""
    async_add_household_entity(hass, entry, async_add_entities, HearthConversationEntity)


class HearthConversationEntity(conversation.ConversationEntity, HearthBaseLLMEntity):
    """Answers with whichever worker the router picks."""

    _attr_unique_id = CONVERSATION_UNIQUE_ID
    _attr_supports_streaming = True  # read by Home Assistant 2025.6 and later

    @property
    def supported_languages(self) -> list[str] | Literal["*"]:
        return MATCH_ALL

    @property
    def supported_features(self) -> conversation.ConversationEntityFeature:
        if self.household.settings.get(CONF_LLM_HASS_API):
            return conversation.ConversationEntityFeature.CONTROL
        return conversation.ConversationEntityFeature(0)

    async def _async_handle_message(
        self,
        user_input: conversation.ConversationInput,
        chat_log: conversation.ChatLog,
    ) -> conversation.ConversationResult:
        settings = self.household.settings
        message = user_input.text
        if len(message) > (limit := self.household.prompt_char_limit()):
            # Longer than any household model could read: refused before anything
            # (preference relevance, a worker) spends time on it.
            return await self._async_error(
                user_input, chat_log, MessageTooLongError(len(message), limit)
            )
        try:
            await async_provide_llm_data(chat_log, user_input, settings)
        except conversation.ConverseError as err:
            return err.as_conversation_result()
        try:
            # language: a cut-off answer ends with a note in the user's language
            await self._async_handle_chat_log(
                chat_log, purpose="voice", language=user_input.language
            )
            return result_from_chat_log(user_input, chat_log)
        except HomeAssistantError as err:
            return await self._async_error(user_input, chat_log, err)

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


def result_from_chat_log(
    user_input: conversation.ConversationInput, chat_log: conversation.ChatLog
) -> conversation.ConversationResult:
    """The answer the chat log ends with, as Home Assistant's own agents give it."""
    get_result: Any = getattr(conversation, "async_get_result_from_chat_log", None)
    if get_result is not None:  # Home Assistant 2025.7 and later
        result: conversation.ConversationResult = get_result(user_input, chat_log)
        return result
    response = intent.IntentResponse(language=user_input.language)
    last = chat_log.content[-1]
    text = last.content if isinstance(last, conversation.AssistantContent) else None
    response.async_set_speech(text or "")
    return conversation.ConversationResult(
        response=response,
        conversation_id=chat_log.conversation_id,
        continue_conversation=chat_log.continue_conversation,
    )
