"""The server's OpenAPI schema is a contract: schemathesis generates requests from it, valid
and invalid, and checks every answer against it with all of its checks, for a server without
a token and for one with a token (its requests carry it; the `ignored_auth` check also sends
them without it, and with a wrong one, and expects 401)."""
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

import cnnkit.serve

TOKEN = "contract-test-token"


def _config(headers: dict) -> schemathesis.config.SchemathesisConfig:
    # An upload the schema calls valid (any bytes) need not be an image: 415 is the
    # documented, right answer to that, so schema-valid data may get it without failing
    # "positive data acceptance". Everything else is schemathesis' defaults, every check on.
    return schemathesis.config.SchemathesisConfig.from_dict({
        "headers": headers,
        "checks": {"positive_data_acceptance": {"expected-statuses": ["2xx", "415"]}},
    })


@pytest.fixture(scope="module", params=["no token", "token"])
def schema(request, png_run):
    token = TOKEN if request.param == "token" else None
    app = cnnkit.serve.create_app(png_run.run_dir, max_upload_mb=1, device="cpu", token=token)
    headers = {"Authorization": f"Bearer {TOKEN}"} if token else {}
    return schemathesis.openapi.from_asgi("/openapi.json", app, config=_config(headers))


def _operations():
    return ["GET /", "GET /healthz", "GET /metrics", "GET /model", "POST /predict"]


@pytest.mark.parametrize("operation", _operations())
def test_every_answer_obeys_the_schema(schema, operation):
    # schemathesis' pytest plugin cannot take a fixture's schema under pytest 9.2 (it sets
    # a node attribute that pytest dropped), so its strategies and checks run under
    # Hypothesis here directly: the same cases, the same checks.
    found = {f"{op.method.upper()} {op.path}": op
             for op in (result.ok() for result in schema.get_all_operations())}
    assert set(found) == set(_operations()), "a new endpoint needs its place here"

    @given(case=found[operation].as_strategy())
    @settings(max_examples=60, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    def check(case):
        case.call_and_validate()
    check()


def test_the_token_is_in_the_schema_where_it_is_asked_for(png_run):
    app = cnnkit.serve.create_app(png_run.run_dir, device="cpu", token=TOKEN)
    spec = app.openapi()
    assert spec["components"]["securitySchemes"]["bearer"] == {"type": "http",
                                                               "scheme": "bearer"}
    for path, ops in spec["paths"].items():
        for op in ops.values():
            locked = path in ("/predict", "/model", "/metrics")
            assert ("security" in op) == locked and ("401" in op["responses"]) == locked, path
    assert "503" in spec["paths"]["/predict"]["post"]["responses"]
