"""Integrations with other frameworks (the top layer: may import dispatch, layer, ...).

megatron.py: megatron-core token dispatcher (optional extra `megatron`); import it explicitly,
`c2r_comm.integrations.megatron`, nothing here imports megatron-core.
megatron_options.py: the adapter's options and the TransformerConfig checks (no megatron-core import).
"""
