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


def _net_parameter():
    """NetParameter with the Data layer's fields (caffe.proto's numbers), to parse a prototxt."""
    file = descriptor_pb2.FileDescriptorProto(name="caffe_net_test.proto", package="caffe_net", syntax="proto2")
    phase = file.enum_type.add(name="Phase")
    for name, number in (("TRAIN", 0), ("TEST", 1)):
        phase.value.add(name=name, number=number)

    def message(name, *fields):
        m = file.message_type.add(name=name)
        for field_name, number, type_, *rest in fields:
            label = F.LABEL_REPEATED if "repeated" in rest else F.LABEL_OPTIONAL
            f = m.field.add(name=field_name, number=number, type=type_, label=label)
            type_names = [r for r in rest if r.startswith(".")]
            if type_names:
                f.type_name = type_names[0]
        return m

    message("NetStateRule", ("phase", 1, F.TYPE_ENUM, ".caffe_net.Phase"))
    message("TransformationParameter", ("scale", 1, F.TYPE_FLOAT), ("mirror", 2, F.TYPE_BOOL),
            ("crop_size", 3, F.TYPE_UINT32), ("mean_file", 4, F.TYPE_STRING),
            ("mean_value", 5, F.TYPE_FLOAT, "repeated"))
    data = message("DataParameter", ("source", 1, F.TYPE_STRING), ("batch_size", 4, F.TYPE_UINT32),
                   ("backend", 8, F.TYPE_ENUM, ".caffe_net.DataParameter.DB"))
    db = data.enum_type.add(name="DB")
    for name, number in (("LEVELDB", 0), ("LMDB", 1)):
        db.value.add(name=name, number=number)
    message("LayerParameter", ("name", 1, F.TYPE_STRING), ("type", 2, F.TYPE_STRING),
            ("top", 4, F.TYPE_STRING, "repeated"),
            ("include", 8, F.TYPE_MESSAGE, "repeated", ".caffe_net.NetStateRule"),
            ("transform_param", 100, F.TYPE_MESSAGE, ".caffe_net.TransformationParameter"),
            ("data_param", 107, F.TYPE_MESSAGE, ".caffe_net.DataParameter"))
    message("NetParameter", ("layer", 100, F.TYPE_MESSAGE, "repeated", ".caffe_net.LayerParameter"))
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("caffe_net.NetParameter"))


NetParameter = _net_parameter()
