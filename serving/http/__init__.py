"""The worker's HTTP layer: one `APIRouter` per concern over the engine and the template service.

- `generations`, `edits`, `templates`, `health`, `metrics`: the routes, short enough to read
  as the API's spec;
- `deps`: what routes ask for (`State`, `ReadyEngine`, `Templates`, `Submit*`), as
  `Annotated` dependencies that answer 503/501 themselves;
- `submit`: the one way a request goes through the engine (429/503, cancel on disconnect,
  failures, the response envelope);
- `uploads`: multipart guards and image/mask decoding; `fields`: checks of fields a schema
  cannot express (the served model, an image's own size);
- `state`: what the routes share (`WorkerState`); `openapi`: the documented errors, and this
  worker's limits in its schema.

Request bodies are typed (`serving.schemas`, shared with the router) and every refusal is an
OpenAI-style error naming its field (`serving.errors`, shared too).

`serving.app.create_app` loads the model and wires these; nothing here imports it, and
nothing below (engine, runner, edits) imports this package.
"""
