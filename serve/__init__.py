"""The online service (Ray Serve): `serve.cli.start(cfg)`, `serve.app.build_app(cfg)`; see docs/serving.md."""
