"""dts-util: a Draw Things gRPC image-generation server with compiled engines."""

__version__ = "0.1.0"
