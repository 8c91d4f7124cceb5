"""Test doubles shipped with accessctl, for trying it out without a real provider."""
