"""Bridges: other systems' protocols in front of the fleet, as clients of the public API."""
