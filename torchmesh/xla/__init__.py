"""The torch-xla SPMD backend (`Mesh(..., backend="xla")`). Imported only when chosen;
`import torchmesh` never imports torch_xla."""
