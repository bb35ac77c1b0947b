"""radflow's offline model simulator: a TEST DOUBLE speaking the OpenAI and Anthropic wire
protocols. Its readings are not medical opinions and every answer says so."""
