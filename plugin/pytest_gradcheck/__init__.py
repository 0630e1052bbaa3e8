"""pytest-gradcheck: the ``assert_grads`` fixture of gradcheck-svc.

Loaded by pytest through the ``pytest11`` entry point (``pytest_gradcheck.plugin``). Importing this
package is nearly free: torch and grpc load only when a check runs.
"""

__all__: list[str] = []
