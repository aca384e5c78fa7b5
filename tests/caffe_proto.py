"""An independent decoder for Caffe's messages: Google's protobuf runtime with a descriptor
built from caffe.proto's field numbers (no protoc, no imgprep code)."""

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

F = descriptor_pb2.FieldDescriptorProto


def _messages():
    file = descriptor_pb2.FileDescriptorProto(name="caffe_test.proto", package="caffe", syntax="proto2")

    def add(message, name, number, type_, label=F.LABEL_OPTIONAL, packed=False, type_name=None):
        field = message.field.add(name=name, number=number, type=type_, label=label)
        if packed:
            field.options.packed = True
        if type_name:
            field.type_name = type_name

    datum = file.message_type.add(name="Datum")
    for name, number in (("channels", 1), ("height", 2), ("width", 3)):
        add(datum, name, number, F.TYPE_INT32)
    add(datum, "data", 4, F.TYPE_BYTES)
    add(datum, "label", 5, F.TYPE_INT32)
    add(datum, "float_data", 6, F.TYPE_FLOAT, F.LABEL_REPEATED)
    add(datum, "encoded", 7, F.TYPE_BOOL)

    shape = file.message_type.add(name="BlobShape")
    add(shape, "dim", 1, F.TYPE_INT64, F.LABEL_REPEATED, packed=True)
    blob = file.message_type.add(name="BlobProto")
    add(blob, "shape", 7, F.TYPE_MESSAGE, type_name=".caffe.BlobShape")
    add(blob, "data", 5, F.TYPE_FLOAT, F.LABEL_REPEATED, packed=True)
    add(blob, "diff", 6, F.TYPE_FLOAT, F.LABEL_REPEATED, packed=True)
    add(blob, "double_data", 8, F.TYPE_DOUBLE, F.LABEL_REPEATED, packed=True)
    for name, number in (("num", 1), ("channels", 2), ("height", 3), ("width", 4)):
        add(blob, name, number, F.TYPE_INT32)

    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    get = message_factory.GetMessageClass
    return (get(pool.FindMessageTypeByName("caffe.Datum")),
            get(pool.FindMessageTypeByName("caffe.BlobProto")))


Datum, BlobProto = _messages()
