"""Rewards: verifiers that score a response (math answers, code run in a sandbox, a user's function)."""
