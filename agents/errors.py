"""The agents package's exception family."""

from __future__ import annotations

from langchain_core.tools import ToolException


class AgentError(Exception):
    """Base class of every error raised by the agents package."""


class ToolError(AgentError, ToolException):
    """A tool could not do what was asked; the message says why.

    It subclasses LangChain's ``ToolException`` so a tool built with
    ``handle_tool_error=True`` turns it into an error tool result instead of
    raising, and the agent loop carries on.
    """


class CalculatorError(ToolError):
    """An expression was refused or could not be evaluated."""


class ToolRegistryError(AgentError):
    """A tool could not be registered or looked up."""
