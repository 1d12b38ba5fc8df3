"""The certification pipeline in its order: noise, votes, statistics, certificate."""
