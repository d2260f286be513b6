"""Stand-ins for the providers, for tests and `sandboxer dev --fake-e2b`: real servers on
127.0.0.1 that speak the providers' own wire protocols, checked by their official
clients (tests/test_fake_e2b.py). Never used in production paths."""
