"""The server's OpenAPI schema is a contract: schemathesis generates requests from it, valid
and invalid, and checks every answer against it with all of its checks."""
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

import cnnkit.serve

# An upload the schema calls valid (any bytes) need not be an image: 415 is the documented,
# right answer to that, so schema-valid data may get it without failing "positive data
# acceptance". Everything else is schemathesis' defaults, every check on.
CONFIG = schemathesis.config.SchemathesisConfig.from_dict({
    "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "415"]}},
})


@pytest.fixture(scope="module")
def schema(png_run):
    app = cnnkit.serve.create_app(png_run.run_dir, max_upload_mb=1, device="cpu")
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=CONFIG)


def _operations():
    return ["GET /", "GET /healthz", "GET /model", "POST /predict"]


@pytest.mark.parametrize("operation", _operations())
def test_every_answer_obeys_the_schema(schema, operation):
    # schemathesis' pytest plugin cannot take a fixture's schema under pytest 9.2 (it sets
    # a node attribute that pytest dropped), so its strategies and checks run under
    # Hypothesis here directly: the same cases, the same checks.
    method, path = operation.split()
    found = {f"{op.method.upper()} {op.path}": op
             for op in (result.ok() for result in schema.get_all_operations())}
    assert set(found) == set(_operations()), "a new endpoint needs its place here"

    @given(case=found[operation].as_strategy())
    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        case.call_and_validate()
    check()
