"""Root conftest: loads the local-cluster fixtures once for every test folder (tests/ and e2e/)."""
pytest_plugins = ["baton.e2e.fixtures"]
