"""The message brokers: Redis (the default) and RabbitMQ (``BROKER_URL=amqp://...``)."""
