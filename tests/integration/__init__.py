"""Tests of the Home Assistant integration (custom_components/hearth)."""
