"""Who may call the API: API keys, scopes, budgets and rate limits."""
