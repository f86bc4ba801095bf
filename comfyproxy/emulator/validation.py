"""Prompt validation, shaped like ComfyUI's `execution.validate_prompt` / `validate_inputs`.

The order of the checks follows ComfyUI on purpose: which check fires first decides the error a client
sees. So do the places where ComfyUI lets a Python exception escape: a link to a missing node is a
KeyError and a bad output slot an IndexError (reported as `exception_during_inner_validation` on the
node that links to them), and a prompt that is not a dict raises TypeError, which the HTTP handler
turns into a 500. Validation converts widget values in place (`"64"` becomes `64` for an INT), as
ComfyUI does, so the queued and historic prompt holds the converted values.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from .catalog import NodeCatalog
from .exceptions import full_type_name, traceback_lines

# ComfyUI leaves out the option list of big combos (scanned model files).
_COMBO_LIST_LIMIT = 20
_WIDGET_CONVERSIONS = (("INT", int), ("FLOAT", float), ("STRING", str), ("BOOLEAN", bool))


@dataclass(frozen=True)
class CustomValidation:
    """A node's own check of some widget values (ComfyUI's VALIDATE_INPUTS).

    `check` is called with those values as keyword arguments; it returns True when they are fine,
    otherwise False or a reason. The listed inputs skip the generic range and list checks.
    """

    input_names: tuple[str, ...]
    check: Callable[..., object]


@dataclass(frozen=True)
class ValidationResult:
    ok: bool
    error: dict | None
    outputs: list[str]
    node_errors: dict


def _error(error_type: str, message: str, details: str = "", extra_info: dict | None = None) -> dict:
    return {"type": error_type, "message": message, "details": details, "extra_info": extra_info or {}}


def _rejected(error: dict) -> ValidationResult:
    return ValidationResult(ok=False, error=error, outputs=[], node_errors={})


def validate_node_input(received_type, input_type) -> bool:
    """Whether an output type may feed an input type (ComfyUI's non-strict rule, with `*` and unions)."""
    if received_type == input_type:
        return True
    if not isinstance(received_type, str) or not isinstance(input_type, str):
        return False
    received_types = {part.strip() for part in received_type.split(",")}
    input_types = {part.strip() for part in input_type.split(",")}
    if "*" in received_types or "*" in input_types:
        return True
    return bool(received_types & input_types)


class PromptValidator:
    def __init__(self, catalog: NodeCatalog, custom_validations: Mapping[str, CustomValidation]):
        self.catalog = catalog
        self.custom_validations = custom_validations

    def validate(self, prompt, partial_execution_targets=None) -> ValidationResult:
        outputs: list[str] = []
        for node_id in prompt:
            node = prompt[node_id]
            if "class_type" not in node:
                return _rejected(
                    _error(
                        "invalid_prompt",
                        "Cannot execute because a node is missing the class_type property.",
                        f"Node ID '#{node_id}'",
                    )
                )
            class_type = node["class_type"]
            node_class = self.catalog.get(class_type)
            if node_class is None:
                return _rejected(
                    _error(
                        "invalid_prompt",
                        f"Cannot execute because node {class_type} does not exist.",
                        f"Node ID '#{node_id}'",
                    )
                )
            if node_class.output_node and (
                partial_execution_targets is None or node_id in partial_execution_targets
            ):
                outputs.append(node_id)

        if not outputs:
            return _rejected(_error("prompt_no_outputs", "Prompt has no outputs"))

        good_outputs: list[str] = []
        failed_outputs: list[tuple[str, list[dict]]] = []
        node_errors: dict = {}
        validated: dict = {}
        for output_id in outputs:
            try:
                valid, reasons, _ = self._validate_inputs(prompt, output_id, validated)
            except Exception as exception:
                valid = False
                reasons = [
                    _error(
                        "exception_during_validation",
                        "Exception when validating node",
                        str(exception),
                        {
                            "exception_type": full_type_name(exception),
                            "traceback": traceback_lines(exception),
                        },
                    )
                ]
                validated[output_id] = (False, reasons, output_id)

            if valid is True:
                good_outputs.append(output_id)
                continue
            failed_outputs.append((output_id, reasons))
            # Like ComfyUI, every failing output is added to every node that has errors so far.
            for node_id, (node_valid, node_reasons, _) in validated.items():
                if node_valid is not True and node_reasons:
                    if node_id not in node_errors:
                        node_errors[node_id] = {
                            "errors": node_reasons,
                            "dependent_outputs": [],
                            "class_type": prompt[node_id]["class_type"],
                        }
                    node_errors[node_id]["dependent_outputs"].append(output_id)

        if not good_outputs:
            details = "\n".join(
                f"{reason['message']}: {reason['details']}"
                for _, reasons in failed_outputs
                for reason in reasons
            )
            error = _error("prompt_outputs_failed_validation", "Prompt outputs failed validation", details)
            return ValidationResult(ok=False, error=error, outputs=[], node_errors=node_errors)
        return ValidationResult(ok=True, error=None, outputs=good_outputs, node_errors=node_errors)

    def _validate_inputs(self, prompt: dict, node_id: str, validated: dict) -> tuple:
        if node_id in validated:
            return validated[node_id]

        inputs = prompt[node_id]["inputs"]
        class_type = prompt[node_id]["class_type"]
        node_class = self.catalog.classes[class_type]
        custom = self.custom_validations.get(class_type)
        custom_inputs = custom.input_names if custom else ()
        declared_inputs = dict.fromkeys(
            [*node_class.input_types.get("required", {}), *node_class.input_types.get("optional", {})]
        )

        errors: list[dict] = []
        valid = True
        for name in declared_inputs:
            input_type, category, options = node_class.input_spec(name)
            if name not in inputs:
                if category == "required":
                    errors.append(
                        _error(
                            "required_input_missing", "Required input is missing", name, {"input_name": name}
                        )
                    )
                continue

            value = inputs[name]
            input_config = [input_type, options]
            if isinstance(value, list):
                if len(value) != 2:
                    errors.append(
                        _error(
                            "bad_linked_input",
                            "Bad linked input, must be a length-2 list of [node_id, slot_index]",
                            name,
                            {"input_name": name, "input_config": input_config, "received_value": value},
                        )
                    )
                    continue
                source_id = value[0]
                source_class = self.catalog.classes[prompt[source_id]["class_type"]]
                received_type = source_class.return_types[value[1]]
                if not validate_node_input(received_type, input_type):
                    errors.append(
                        _error(
                            "return_type_mismatch",
                            "Return type mismatch between linked nodes",
                            f"{name}, received_type({received_type}) mismatch input_type({input_type})",
                            {
                                "input_name": name,
                                "input_config": input_config,
                                "received_type": received_type,
                                "linked_node": value,
                            },
                        )
                    )
                    continue
                try:
                    if self._validate_inputs(prompt, source_id, validated)[0] is False:
                        valid = False
                except Exception as exception:
                    # The failure is pinned on the linked node, described from this node's input.
                    valid = False
                    validated[source_id] = (
                        False,
                        [
                            _error(
                                "exception_during_inner_validation",
                                "Exception when validating inner node",
                                str(exception),
                                {
                                    "input_name": name,
                                    "input_config": input_config,
                                    "exception_message": str(exception),
                                    "exception_type": full_type_name(exception),
                                    "traceback": traceback_lines(exception),
                                    "linked_node": value,
                                },
                            )
                        ],
                        source_id,
                    )
                continue

            try:
                value = self._convert_widget_value(inputs, name, value, input_type)
            except Exception as exception:
                errors.append(
                    _error(
                        "invalid_input_type",
                        f"Failed to convert an input value to a {input_type} value",
                        f"{name}, {value}, {exception}",
                        {
                            "input_name": name,
                            "input_config": input_config,
                            "received_value": value,
                            "exception_message": str(exception),
                        },
                    )
                )
                continue
            if name not in custom_inputs:
                error = self._check_widget_value(name, value, input_type, options, input_config)
                if error is not None:
                    errors.append(error)

        if custom_inputs:
            errors.extend(self._custom_validation(custom, inputs))

        result = (False, errors, node_id) if errors or valid is not True else (True, [], node_id)
        validated[node_id] = result
        return result

    @staticmethod
    def _convert_widget_value(inputs: dict, name: str, value, input_type):
        if isinstance(value, dict) and "__value__" in value:
            value = value["__value__"]
            inputs[name] = value
        for type_name, convert in _WIDGET_CONVERSIONS:
            if input_type == type_name:  # compared, not looked up: a combo's type is a list
                value = convert(value)
                inputs[name] = value
        return value

    @staticmethod
    def _check_widget_value(name: str, value, input_type, options: dict, input_config: list) -> dict | None:
        if "min" in options and value < options["min"]:
            return _error(
                "value_smaller_than_min",
                f"Value {value} smaller than min of {options['min']}",
                name,
                {"input_name": name, "input_config": input_config, "received_value": value},
            )
        if "max" in options and value > options["max"]:
            return _error(
                "value_bigger_than_max",
                f"Value {value} bigger than max of {options['max']}",
                name,
                {"input_name": name, "input_config": input_config, "received_value": value},
            )
        if isinstance(input_type, list) or input_type == "COMBO":
            choices = options.get("options", []) if input_type == "COMBO" else input_type
            if value not in choices:
                if len(choices) > _COMBO_LIST_LIMIT:
                    list_info, shown_config = f"(list of length {len(choices)})", None
                else:
                    list_info, shown_config = str(choices), input_config
                return _error(
                    "value_not_in_list",
                    "Value not in list",
                    f"{name}: '{value}' not in {list_info}",
                    {"input_name": name, "input_config": shown_config, "received_value": value},
                )
        return None

    @staticmethod
    def _custom_validation(custom: CustomValidation, inputs: dict) -> list[dict]:
        # Linked inputs are not known before execution: the check sees None for them.
        values = {
            name: (None if isinstance(inputs[name], list) else inputs[name])
            for name in custom.input_names
            if name in inputs
        }
        verdict = custom.check(**values)
        if verdict is True:
            return []
        suffix = "" if verdict is False else f" - {verdict}"
        return [
            _error(
                "custom_validation_failed",
                "Custom validation failed for node",
                f"{name}{suffix}",
                {"input_name": name},
            )
            for name in values
        ]
