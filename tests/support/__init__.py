"""Test support code shared by several test packages (real processes, fixtures).

Owns nothing at runtime; modules here start and stop helper processes for tests
only and are never imported by the product packages.
"""
