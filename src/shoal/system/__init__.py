"""Operating-system helpers shared by the agent, the CLI and the embedded server: process
groups and parent-death signals, and glibc malloc tuning for bulk output.
"""
