"""Plugins and what they register: hook specifications, the pluggy manager, the name -> spec
tables, the spec types, and backend selection. Imports no engine."""
