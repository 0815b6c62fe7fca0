"""The bottleneck adapter module, and where it goes inside a transformer layer.

An adapter is a down-projection d→m, a non-linearity and an up-projection m→d. Its
up-projection starts at zero, so a model with fresh adapters computes exactly what the
base model computes, and training starts from the base model's behaviour.

Adapters are attached with forward hooks and registered as children of their layer
(`...layers.3.adapter_after_ffn`). The base model's modules are left in place, so its
own weights keep their names, and the adapters are the only new entries in its state dict.
"""

from dataclasses import dataclass

from torch import nn

ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}


class BottleneckAdapter(nn.Module):
    def __init__(self, hidden_size, bottleneck_size, activation, scaling):
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck_size)
        self.activation = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck_size, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scaling = scaling

    def forward(self, hidden_states):
        """What the adapter adds to the stream; the residual is the placement's business."""
        return self.scaling * self.up(self.activation(self.down(hidden_states)))

    # The hooks are bound methods, not closures: a deep copy of the model (copy.deepcopy,
    # as an EMA or a merged copy is made) then calls its own copy of each adapter.

    def add_to_output(self, module, args, output):
        """Serial: the sub-block's output x becomes x + f(x)."""
        if isinstance(output, tuple):  # Llama's attention returns (output, attention weights)
            return (output[0] + self(output[0]), *output[1:])
        return output + self(output)

    def add_from_input(self, module, args, output):
        """Parallel: f of the sub-block's input is added to its output."""
        return output + self(args[0])

    def add_to_residual_input(self, module, args):
        """Parallel, for BERT's FFN: see SITES["bert"]["beside_ffn"]."""
        hidden_states, residual = args
        return hidden_states, residual + self(residual)


@dataclass(frozen=True)
class Site:
    module: str  # the hooked module, by its path inside the transformer layer
    hook: str  # the BottleneckAdapter method that does the adding
    rewrites_inputs: bool = False  # a forward pre-hook, which changes the module's arguments


# Where each adapter goes, per architecture family. The layer is recognised by the children it has.
LAYER_CHILDREN = {"llama": ("self_attn", "mlp"), "bert": ("attention", "intermediate", "output")}
SITES = {
    # Pre-norm Llama: the attention and MLP outputs, before each is added to the residual stream.
    "llama": {
        "after_attention": Site("self_attn", "add_to_output"),
        "after_ffn": Site("mlp", "add_to_output"),
        "beside_ffn": Site("mlp", "add_from_input"),
    },
    # Post-norm BERT: after each dense projection, before its LayerNorm(x + residual), as Houlsby et al. place it.
    "bert": {
        "after_attention": Site("attention.output.dense", "add_to_output"),
        "after_ffn": Site("output.dense", "add_to_output"),
        # The FFN's input (the attention output) reaches BertOutput as its residual argument, and
        # BertOutput computes LayerNorm(dense(h) + residual). Adding f(residual) to the residual
        # is therefore adding it to the FFN's output, with no module of BERT's rewritten.
        "beside_ffn": Site("output", "add_to_residual_input", rewrites_inputs=True),
    },
}
PLACEMENTS = {
    "houlsby": ("after_attention", "after_ffn"),
    "pfeiffer": ("after_ffn",),
    "parallel": ("beside_ffn",),
}
ADAPTER_NAME_PREFIX = "adapter_"


@dataclass
class PlannedAdapter:
    """An adapter built for one site of one layer, not yet part of the model."""

    layer: nn.Module
    site_name: str
    site: Site
    adapter: BottleneckAdapter

    def attach(self):
        self.layer.add_module(ADAPTER_NAME_PREFIX + self.site_name, self.adapter)
        hooked = self.layer.get_submodule(self.site.module)
        hook = getattr(self.adapter, self.site.hook)
        if self.site.rewrites_inputs:
            hooked.register_forward_pre_hook(hook)
        else:
            hooked.register_forward_hook(hook)


def plan_adapters(model, family, placement, bottleneck_size, activation, scaling):
    """{name the adapter will have in the model: PlannedAdapter}, in layer order.

    Nothing is attached yet, so a caller can check a saved state dict against the
    adapters' own before touching the model.
    """
    if family not in SITES:
        raise ValueError(
            f"bottleneck adapters support the {' and '.join(SITES)} architecture families; "
            f"this model ({type(model).__name__}) is neither"
        )
    layers = transformer_layers(model, family)
    if not layers:
        raise ValueError(f"found no {family}-style transformer layers in {type(model).__name__}")
    hidden_size = model.config.hidden_size
    planned = {}
    for layer_name, layer in layers:
        reference = next(layer.parameters())
        for site_name in PLACEMENTS[placement]:
            if hasattr(layer, ADAPTER_NAME_PREFIX + site_name):
                raise ValueError(f"{layer_name} already has a bottleneck adapter; apply adapters to a base model once")
            adapter = BottleneckAdapter(hidden_size, bottleneck_size, activation, scaling)
            adapter.to(device=reference.device, dtype=reference.dtype)
            name = f"{layer_name}.{ADAPTER_NAME_PREFIX}{site_name}"
            planned[name] = PlannedAdapter(layer, site_name, SITES[family][site_name], adapter)
    return planned


def transformer_layers(model, family):
    """[(name, layer)] of the model's transformer layers, in order."""
    children = LAYER_CHILDREN[family]
    return [
        (name, module)
        for name, module in model.named_modules()
        if all(isinstance(getattr(module, child, None), nn.Module) for child in children)
    ]


def adapter_modules(model):
    """{name: adapter} of the bottleneck adapters attached to the model."""
    return {name: module for name, module in model.named_modules() if isinstance(module, BottleneckAdapter)}
