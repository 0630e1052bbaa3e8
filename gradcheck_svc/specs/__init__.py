"""What a remote client may name: safe expressions, registered functions and sampled points.

from gradcheck_svc.specs import compile_expression
f = compile_expression("u**2 + v**3 + u*v")
f.variables                      # ('u', 'v')
f(torch.tensor(2.0), v=torch.tensor(4.0))
"""

from gradcheck_svc.specs.expression import Expression, ExpressionLimits, compile_expression, parse_expression
from gradcheck_svc.specs.mathfns import EXPRESSION_FUNCTIONS
from gradcheck_svc.specs.registry import ENTRY_POINT_GROUP, FunctionRegistry, RegisteredFunction
from gradcheck_svc.specs.sampling import SampledInput, SamplingSpec, sample_points

__all__ = [
    "ENTRY_POINT_GROUP",
    "EXPRESSION_FUNCTIONS",
    "Expression",
    "ExpressionLimits",
    "FunctionRegistry",
    "RegisteredFunction",
    "SampledInput",
    "SamplingSpec",
    "compile_expression",
    "parse_expression",
    "sample_points",
]
