"""Stateless SQL: repositories execute statements on a connection and never commit."""
