"""The model registry (`registry`): our small CNN, torchvision's AlexNet and every timm model,
each offering timm's interface; the weights they start from (`weights`); `pipeline summary`
(`summary`). The names below are the package's interface."""
from pipeline.models.registry import (
                                      IMAGENET_MEAN,
                                      IMAGENET_STD,
                                      REGISTRY,
                                      Entry,
                                      build_model,
                                      check_model_name,
                                      count_parameters,
                                      entry,
                                      has_pretrained_weights,
                                      head_of,
                                      head_parameter_names,
                                      list_models,
                                      min_image_size,
                                      model_name_problem,
                                      pre_logits,
                                      reset_head,
                                      stage_prefixes,
)
from pipeline.models.small_cnn import SmallCNN

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "REGISTRY", "Entry", "SmallCNN", "build_model", "check_model_name",
           "count_parameters", "entry", "has_pretrained_weights", "head_of", "head_parameter_names", "list_models",
           "min_image_size", "model_name_problem", "pre_logits", "reset_head", "stage_prefixes"]
