"""Every method name: pre-fill methods, decode methods, "PREFILL+DECODE" specs, variants.

(Transitional face: re-exports the tables that still live in stem_cli.methods and stem_cli.decode.)
"""

from stem_cli.methods import METHODS, Method, build_configs, get_method, parse_method_list  # noqa: F401
from stem_cli.decode import DECODE_METHODS, get_decode_method, is_decode_spec, split_spec  # noqa: F401
