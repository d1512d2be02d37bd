// rapidjson, as cereal ships it: Debian's libcereal-dev uses the system copy
// (rapidjson-dev) instead of the bundled one. `rj` names whichever is there.
#pragma once

#if __has_include(<cereal/external/rapidjson/document.h>)
#include <cereal/external/rapidjson/document.h>
#include <cereal/external/rapidjson/error/en.h>
#include <cereal/external/rapidjson/prettywriter.h>
#include <cereal/external/rapidjson/stringbuffer.h>
#include <cereal/external/rapidjson/writer.h>
namespace rj = CEREAL_RAPIDJSON_NAMESPACE;
#else
#include <rapidjson/document.h>
#include <rapidjson/error/en.h>
#include <rapidjson/prettywriter.h>
#include <rapidjson/stringbuffer.h>
#include <rapidjson/writer.h>
namespace rj = rapidjson;
#endif
