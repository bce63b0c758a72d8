"""Training data: image streams (scenes, folders), tar shards, and the frozen-LLM feature cache."""
