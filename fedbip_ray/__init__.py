"""fedbip-ray: personalized federated fine-tuning with FedBip on Ray."""

__version__ = "0.1.0"
