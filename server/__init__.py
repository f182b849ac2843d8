"""The adaptive OpenAI-compatible server (`uniql serve`): app/schema/errors/responses/metrics are the HTTP layer
(no torch); bridge/weights are the engine side; monitor, controller and residency decide rungs and residency."""
